"""`bali-zero-bridge`: serve the bridge (default) or run an audit command.

The environment is read here, once, into a Settings object that everything else receives.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Mapping
from types import FrameType

import uvicorn

from bridge.audit.cli import add_audit_commands
from bridge.config import ConfigError, Settings


def load_environment(env_file: str | None) -> Mapping[str, str]:
    environ = dict(os.environ)
    if env_file:
        from dotenv import dotenv_values

        if not os.path.isfile(env_file):
            raise ConfigError(f"--env-file {env_file!r}: no such file")
        file_values = {k: v for k, v in dotenv_values(env_file).items() if v is not None}
        environ = {**file_values, **environ}  # the real environment wins over the file
    return environ


class _Server(uvicorn.Server):
    """uvicorn's server, announcing readiness and telling the app when SIGTERM arrives."""

    def __init__(self, config: uvicorn.Config, on_exit_signal: object, announce: str) -> None:
        super().__init__(config)
        self._on_exit_signal = on_exit_signal
        self._announce = announce

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if not self.should_exit:
            print(self._announce, flush=True)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        callback = self._on_exit_signal
        if callable(callback):
            with contextlib.suppress(RuntimeError):  # no loop running: nothing to drain
                asyncio.get_running_loop().call_soon_threadsafe(callback)
        super().handle_exit(sig, frame)
        # uvicorn re-raises a captured SIGTERM after shutting down, so the process would die by
        # the signal; a drained, orderly shutdown exits 0 instead.
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list) and sig == signal.SIGTERM:
            captured.remove(sig)


def serve(settings: Settings, host: str, port: int) -> int:
    from bridge.app import create_app
    from bridge.logs import configure_logging
    from bridge.state import BridgeState

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        print(f"bali-zero-bridge: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 1
    bound_port = sock.getsockname()[1]
    configure_logging(settings)
    state = BridgeState.from_settings(settings)
    app = create_app(settings, state)
    config = uvicorn.Config(
        app,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        log_level=settings.log_level.lower(),
        log_config=None,  # keep the bridge's JSON logging (bridge/logs.py) for uvicorn's loggers too
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s) + 5,
        server_header=False,
        # uvicorn would rewrite the client address from X-Forwarded-For for any loopback peer,
        # letting a local client pick its own rate-limit key; bridge/clientip.py decides instead.
        proxy_headers=False,
    )
    shown_host = f"[{host}]" if ":" in host else host
    server = _Server(config, state.begin_drain, f"bali-zero-bridge listening on http://{shown_host}:{bound_port}")
    server.run(sockets=[sock])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bali-zero-bridge", description="gRPC → Server-Sent Events bridge")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--env-file", default=None, help="load settings from a .env file")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="serve HTTP (the default)")
    add_audit_commands(sub, lambda args: Settings.from_env(load_environment(args.env_file)))
    args = parser.parse_args(argv)
    try:
        if args.command == "audit":
            code: int = args.func(args)
            return code
        settings = Settings.from_env(load_environment(args.env_file))
    except ConfigError as exc:
        print(f"bali-zero-bridge: invalid configuration: {exc}", file=sys.stderr)
        return 2
    return serve(settings, args.host, args.port)
