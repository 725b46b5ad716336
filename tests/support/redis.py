"""A real redis-server on a free loopback port, for tests that share state across instances.

``redis_server`` yields the URL; ``redis_factory`` starts servers a test can kill (and restart on
the same port) mid-test. Readiness is Redis's own "Ready to accept connections" log line, never a
sleep. Output is pumped on a thread that is joined before the pipe is closed, so no file handle
outlives the test (a ResourceWarning under ``-W error``).
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable, Iterator

import pytest

from tests.conftest import require_binary
from tests.support.processes import free_port, with_port_retries

_READY = "Ready to accept connections"


class RedisServer:
    """One redis-server without persistence; ``url`` points at database 0."""

    def __init__(self, binary: str, port: int | None = None, ready_timeout: float = 20) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--loglevel",
                "notice",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
        )
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()
        if not self._ready.wait(ready_timeout) or not any(_READY in line for line in self.lines):
            self.kill()
            raise RuntimeError(f"redis-server on port {self.port} did not start: {self.lines[-10:]}")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if _READY in line:
                self._ready.set()
        self._ready.set()  # EOF: the process died; wake the starter so it can report

    def kill(self) -> None:
        """SIGKILL (no clean shutdown, like a crash) and release the pipe."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._pump.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


RedisFactory = Callable[..., RedisServer]


@pytest.fixture
def redis_factory() -> Iterator[RedisFactory]:
    binary = require_binary("redis-server", "/usr/bin/redis-server")
    started: list[RedisServer] = []

    def start(port: int | None = None) -> RedisServer:
        """Start a server (on ``port``, e.g. to restart a killed one, else on a free port)."""
        server = with_port_retries(lambda: RedisServer(binary, port), attempts=1 if port is not None else 3)
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


@pytest.fixture
def redis_server(redis_factory: RedisFactory) -> str:
    """URL of a fresh redis-server, e.g. ``redis://127.0.0.1:PORT/0``; stopped after the test."""
    return str(redis_factory().url)
