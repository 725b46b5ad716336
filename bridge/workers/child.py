"""One worker of ``--workers N``: serves the socket its supervisor passed it (bridge/workers).

Started by the supervisor only (``python -m bridge.workers.child --fd N --control-fd M ...``),
with the environment the supervisor's settings were read from. It reports ``ready`` on its
control socket instead of printing the listening line, and drains (as on SIGTERM) when that
socket closes: the supervisor is gone, and nobody would stop this worker otherwise.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from pathlib import Path

from bridge.cli import load_environment, serve_on
from bridge.config import Settings
from bridge.errors import ConfigError
from bridge.metrics import name_metric_files
from bridge.workers.role import WorkerRole, metric_files_id

READY = b"ready\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bali-zero-bridge worker", description=__doc__)
    parser.add_argument("--fd", type=int, required=True, help="the listening socket")
    parser.add_argument("--control-fd", type=int, required=True, help="the socketpair end to the supervisor")
    parser.add_argument("--slot", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--server-id", required=True)
    parser.add_argument("--runtime-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    control = socket.socket(fileno=args.control_fd)
    sock = socket.socket(fileno=args.fd)
    try:
        settings = Settings.from_env(load_environment(None))
    except ConfigError as exc:
        print(f"bali-zero-bridge: invalid configuration: {exc}", file=sys.stderr)
        return 2
    role = WorkerRole(args.slot, args.count, args.server_id, args.runtime_dir)
    name_metric_files(metric_files_id(role.slot))  # before any metric exists

    def ready() -> None:
        try:
            control.sendall(READY)
        except OSError:  # the supervisor is already gone: stop as on SIGTERM
            os.kill(os.getpid(), signal.SIGTERM)
            return
        _drain_when_orphaned(control)

    try:
        return serve_on(settings, sock, ready, role)
    finally:
        control.close()


def _drain_when_orphaned(control: socket.socket) -> None:
    """Once the supervisor's end of ``control`` closes (it died), stop as on SIGTERM."""
    import asyncio

    loop = asyncio.get_running_loop()
    control.setblocking(False)

    def readable() -> None:
        try:
            data = control.recv(64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(control.fileno())
            os.kill(os.getpid(), signal.SIGTERM)

    loop.add_reader(control.fileno(), readable)


if __name__ == "__main__":
    raise SystemExit(main())
