"""A real redis-server on a free loopback port, for tests that share state across instances.

``redis_server`` yields the URL; ``redis_factory`` starts servers a test can kill mid-test.
Readiness is Redis's own "Ready to accept connections" log line, never a sleep.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import pytest

from tests.conftest import require_binary
from tests.support.processes import ROOT, Process, base_env, free_port


class RedisServer(Process):
    """One redis-server without persistence; ``url`` points at database 0."""

    ready_pattern = re.compile(r".*Ready to accept connections")

    def __init__(self, binary: str, port: int | None = None) -> None:
        self.port = port or free_port()
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--loglevel", "notice"]
        super().__init__(argv, base_env(), ROOT)
        self.url = f"redis://127.0.0.1:{self.port}/0"


RedisFactory = Callable[..., RedisServer]


@pytest.fixture
def redis_factory() -> Iterator[RedisFactory]:
    binary = require_binary("redis-server", "/usr/bin/redis-server")
    started: list[RedisServer] = []

    def start(port: int | None = None) -> RedisServer:
        """Start a server (on ``port``, e.g. to restart a killed one, else on a free port)."""
        for attempt in range(3):  # the free port can be taken between probe and bind
            try:
                server = RedisServer(binary, port)
            except RuntimeError:
                if attempt == 2 or port is not None:
                    raise
                continue
            started.append(server)
            return server
        raise AssertionError("unreachable")

    yield start
    for server in started:
        server.kill()


@pytest.fixture
def redis_server(redis_factory: RedisFactory) -> str:
    """URL of a fresh redis-server, e.g. ``redis://127.0.0.1:PORT/0``; stopped after the test."""
    return redis_factory().url
