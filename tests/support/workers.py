"""A bridge of two workers on one port (``WORKERS=2``), sharing one real redis-server."""

from __future__ import annotations

import time
from pathlib import Path

import psutil

from tests.support.processes import Bridge


def two_workers(redis_url: str, **env: str) -> dict[str, str]:
    """The environment of a two-worker bridge: limits, caps, resume and stops shared in Redis."""
    return {"WORKERS": "2", "RATE_LIMIT_STORAGE": redis_url, "RESUME_STORE": redis_url, **env}


def worker_pids(bridge: Bridge) -> list[int]:
    """The pids of the supervisor's live workers (its direct children)."""
    return sorted(child.pid for child in psutil.Process(bridge.proc.pid).children() if child.is_running())


def wait_for_workers(bridge: Bridge, count: int, other_than: set[int], timeout: float = 30) -> list[int]:
    """Wait until ``count`` workers run, none of them in ``other_than``.

    A replacement may still be starting: connections the kernel gives its socket meanwhile wait
    in that socket's queue, which the supervisor keeps open, until it serves them.
    """
    deadline = time.monotonic() + timeout
    while True:
        pids = worker_pids(bridge)
        if len(pids) == count and not set(pids) & other_than:
            return pids
        assert time.monotonic() < deadline, (pids, bridge.output())
        time.sleep(0.05)  # polling a process table: there is no event to await


def connections_held(pid: int, port: int) -> int:
    """Client connections worker ``pid`` holds open on ``port`` (the kernel chose the worker)."""
    return sum(
        1
        for conn in psutil.Process(pid).net_connections(kind="tcp")
        if conn.status == psutil.CONN_ESTABLISHED and conn.laddr and conn.laddr.port == port
    )


def worker_place(pid: int) -> tuple[int, Path]:
    """A worker's slot and its supervisor's private directory, from the worker's command line."""
    args = dict(arg.removeprefix("--").split("=", 1) for arg in psutil.Process(pid).cmdline() if "=" in arg)
    return int(args["slot"]), Path(args["runtime-dir"])
