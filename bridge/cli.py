"""`bali-zero-bridge`: serve the bridge (default) or run an audit command.

The environment is read here, once, into a Settings object that everything else receives.
"""

from __future__ import annotations

# ruff: noqa: E402 (the imports below come after gRPC's log default is set)
import os

from bridge.grpc_logs import quiet_grpc_core_logs

# Before anything imports grpc: its C core reads GRPC_VERBOSITY once, at import.
quiet_grpc_core_logs(os.environ)

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import signal
import socket
import sqlite3
import sys
from collections.abc import Callable, Mapping
from types import FrameType

import uvicorn

from bridge.audit.cli import add_audit_commands
from bridge.config import Settings, parse_workers, variables_help
from bridge.doctor.probe import add_doctor_command, run_doctor
from bridge.errors import ConfigError, UnsupportedUvicorn
from bridge.server.netsock import HalfOpenDetection
from bridge.workers.role import WorkerRole

PATH_VARIABLES = ("AUDIT_DB", "LOG_FILE", "ERROR_LOG_FILE", "JWT_PUBLIC_KEY_FILE")
"""Settings naming files: a relative one in an env file is relative to that file, not to the cwd,
so the server and `audit verify` started from different directories find the same store."""


def load_environment(env_file: str | None) -> Mapping[str, str]:
    environ = dict(os.environ)
    if env_file:
        from dotenv import dotenv_values

        if not os.path.isfile(env_file):
            raise ConfigError(f"--env-file {env_file!r}: no such file")
        file_values = {k: v for k, v in dotenv_values(env_file).items() if v is not None}
        base = os.path.dirname(os.path.abspath(env_file))
        for name in PATH_VARIABLES:
            value = file_values.get(name, "").strip()
            if value and not os.path.isabs(value):
                file_values[name] = os.path.join(base, value)
        environ = {**file_values, **environ}  # the real environment wins over the file
    return environ


def print_config(settings: Settings) -> int:
    """`bali-zero-bridge config`: the effective settings, one VARIABLE=value a line, secrets masked."""
    for name, value in settings.effective():
        print(f"{name}={value}")
    return 0


class _Server(uvicorn.Server):
    """uvicorn's server, announcing readiness and telling the app when SIGTERM or SIGINT arrives."""

    def __init__(
        self,
        config: uvicorn.Config,
        on_exit_signal: object,
        announce: Callable[[], None],
        on_repeated_signal: object = None,
    ) -> None:
        super().__init__(config)
        self._on_exit_signal = on_exit_signal
        self._on_repeated_signal = on_repeated_signal
        self._announce = announce

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if not self.should_exit:
            self._announce()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        repeated = self.should_exit
        callback = self._on_repeated_signal if repeated else self._on_exit_signal
        if callable(callback):
            with contextlib.suppress(RuntimeError):  # no loop running: nothing to drain
                asyncio.get_running_loop().call_soon_threadsafe(callback)
        if repeated and callable(self._on_repeated_signal):
            # Ctrl-C twice (or Ctrl-C in `make run`, which also sends SIGTERM): the streams are being
            # ended now, so uvicorn's force-exit, which cancels handlers mid-stream (a CancelledError
            # traceback each) and skips the lifespan shutdown (the audit flush), is not needed.
            return
        super().handle_exit(sig, frame)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _after_drain(sig: int, frame: FrameType | None) -> None:
    """SIGTERM's and SIGINT's handler once uvicorn has shut down: the drain is over, do nothing.

    uvicorn restores the handlers it found and re-raises a captured signal after its graceful
    shutdown; with the default handlers the process would then die by SIGTERM (exit -15) or raise
    a KeyboardInterrupt inside the loop (a CancelledError traceback per open handler) although
    every stream was drained. Installed before uvicorn runs, this handler is the one it restores,
    so an orderly shutdown exits 0 (no private uvicorn state is touched).
    """


def listen_socket(settings: Settings, host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A TCP socket bound to ``host:port`` with the half-open detection options; OSError if taken.

    ``reuse_port``: SO_REUSEPORT, so the supervisor can bind one socket per worker to one port
    (bridge/workers/supervisor.py). Only sockets of this same user can join such a group.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        # Accepted sockets inherit these: a client that vanished without a FIN is dropped in seconds.
        HalfOpenDetection(settings.tcp_user_timeout_s, settings.tcp_keepalive_s).apply(sock)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def listening_url(host: str, port: int) -> str:
    shown_host = f"[{host}]" if ":" in host else host
    return f"http://{shown_host}:{port}"


def serve(settings: Settings, host: str, port: int, environ: Mapping[str, str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT; with ``settings.workers`` > 1 through the worker supervisor,
    which starts each worker with ``environ`` (the environment the settings were read from)."""
    try:
        # Before anything that serves is imported: a uvicorn the connection protocol was not
        # tested with, or one lacking a name it uses, is one line here, not an error mid-request.
        from bridge.server.uvicorn_fence import require_supported_uvicorn

        require_supported_uvicorn()
    except UnsupportedUvicorn as exc:
        print(f"bali-zero-bridge: cannot start: {exc}", file=sys.stderr)
        return 2
    if settings.workers > 1:
        from bridge.workers.supervisor import supervise

        return supervise(settings, dict(environ or os.environ), host, port)
    try:
        sock = listen_socket(settings, host, port)
    except OSError as exc:
        print(f"bali-zero-bridge: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 1
    announce = f"bali-zero-bridge listening on {listening_url(host, sock.getsockname()[1])}"
    return serve_on(settings, sock, lambda: print(announce, flush=True))


def serve_on(
    settings: Settings, sock: socket.socket, announce: Callable[[], None], role: WorkerRole | None = None
) -> int:
    """Serve on the bound ``sock`` (one process, or one worker of several); ``announce`` once ready."""
    from bridge.app import create_app
    from bridge.logs import configure_logging
    from bridge.server.protocol import ConnectionLimits, protocol_class
    from bridge.state import BridgeState

    try:
        configure_logging(settings)
        state = BridgeState.from_settings(settings, role=role)
    except ConfigError as exc:
        # A file it must trust (audit key, store, log) that another user could choose, or a
        # malformed audit key or JWT key file: like a bad variable, one line and exit 2.
        sock.close()
        print(f"bali-zero-bridge: invalid configuration: {exc}", file=sys.stderr)
        return 2
    except (OSError, sqlite3.Error) as exc:
        # A valid path that cannot be written here (read-only mount, /proc): one line, not a traceback.
        sock.close()
        print(f"bali-zero-bridge: cannot start: {exc}", file=sys.stderr)
        return 1
    app = create_app(settings, state)
    config = uvicorn.Config(
        app,
        loop="uvloop",
        # httptools with the request head bounded in bytes and time as it arrives, and the idle
        # keep-alive timeout (KEEPALIVE_TIMEOUT_S) applied by the protocol.
        http=protocol_class(ConnectionLimits.from_settings(settings), state.metrics),
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

    def ready() -> None:
        freeze_startup_heap()
        announce()

    server = _Server(config, state.begin_drain, ready, on_repeated_signal=state.end_streams_now)
    previous = {sig: signal.signal(sig, _after_drain) for sig in STOP_SIGNALS}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def freeze_startup_heap() -> None:
    """Exempt what the process holds once it serves from every later garbage collection.

    Modules, classes, functions, settings and the app stay alive for the whole run, and a full
    collection traversed all of them each time it ran: a pause of the one event loop that every
    stream waits through, long enough at a few hundred streams to push first tokens past their
    target. Frozen (after one collection, so startup's garbage is freed rather than kept), later
    collections traverse only what the streams themselves made.
    """
    gc.collect()
    gc.freeze()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bali-zero-bridge",
        description="gRPC → Server-Sent Events bridge",
        epilog=variables_help() + "\n\nAPI reference: GET /docs on a running bridge.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--env-file", default=None, help="load settings from a .env file")
    parser.add_argument(
        "--workers",
        type=_workers_option,
        default=None,
        metavar="N",
        help="server processes on one port, or `auto` (overrides WORKERS; above 1 needs Redis, see WORKERS)",
    )
    # The same option after a subcommand (`audit verify --env-file .env`); SUPPRESS keeps the
    # top-level value when it is not repeated there.
    env_file = argparse.ArgumentParser(add_help=False)
    env_file.add_argument("--env-file", default=argparse.SUPPRESS, help="load settings from a .env file")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="serve HTTP (the default)", parents=[env_file])
    sub.add_parser("config", help="print the effective settings (secrets masked) and exit", parents=[env_file])
    add_audit_commands(sub, lambda args: Settings.from_env(load_environment(args.env_file)), parents=[env_file])
    add_doctor_command(sub)
    args = parser.parse_args(argv)
    if args.command == "doctor":  # a client of some bridge: needs none of this bridge's settings
        return run_doctor(args)
    try:
        if args.command == "audit":
            code: int = args.func(args)
            return code
        environ = load_environment(args.env_file)
        settings = Settings.from_env(environ)
        if args.workers is not None:
            settings = dataclasses.replace(settings, workers=args.workers)
            settings.validate()
        if args.command == "config":
            return print_config(settings)
    except ConfigError as exc:
        print(f"bali-zero-bridge: invalid configuration: {exc}", file=sys.stderr)
        return 2
    return serve(settings, args.host, args.port, environ)


def _workers_option(text: str) -> int:
    """``--workers``: as WORKERS (a number, or ``auto``), checked by the same rule."""
    try:
        return parse_workers(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of workers or auto, got {text!r}") from None
