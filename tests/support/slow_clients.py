"""Probes for the connection attacks (tests/adversarial/test_request_head.py, tests/adversarial/test_request_body.py).

The attacking connection's record (``SlowClient``), the bridge's own count of the connections it
closed, /healthz latency sampled from another process while attackers hold connections, and the
time until the bridge closes a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any

import httpx

from tests.support.processes import Bridge


class SlowClient:
    """One attacking connection as the bridge treated it: everything it wrote (``reply``), when it
    closed the connection (``closed_after``, seconds from the ``since`` given to ``reading``; None
    while open), and ``started``, set by the subclass once its first bytes are out.

    A subclass's ``run`` opens the connection and sends, slowly, inside ``reading``.
    """

    def __init__(self) -> None:
        self.reply = b""
        self.closed_after: float | None = None
        self.started = asyncio.Event()

    @contextlib.asynccontextmanager
    async def reading(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, since: float
    ) -> AsyncIterator[asyncio.Future[None]]:
        """Collect what the bridge writes while the block sends; yields the read, done once the
        bridge closed the connection. The connection is closed when the block ends, however it ends."""
        read = asyncio.ensure_future(self._read_to_eof(reader, since))
        try:
            yield read
        finally:
            read.cancel()
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _read_to_eof(self, reader: asyncio.StreamReader, since: float) -> None:
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                self.reply += chunk
        self.closed_after = time.monotonic() - since

    def answers(self) -> list[tuple[int, dict[str, Any]]]:
        """Every response on the connection: (status, JSON body)."""
        found: list[tuple[int, dict[str, Any]]] = []
        for part in self.reply.split(b"HTTP/1.1 ")[1:]:
            head, body = part.split(b"\r\n\r\n", 1)
            found.append((int(head[:3]), json.loads(body)))
        return found

    def codes(self) -> list[tuple[int, str]]:
        """Every response on the connection: (status, error code)."""
        return [(status, body["error"]["code"]) for status, body in self.answers()]


def closed_by_bridge(bridge: Bridge) -> dict[str, float]:
    """``bridge_connections_closed_total`` by reason, as the bridge's /metrics reports it."""
    text = httpx.get(f"{bridge.url}/metrics", timeout=10).text
    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(r'^bridge_connections_closed_total\{reason="(\w+)"\} (\S+)$', text, re.MULTILINE)
    }


# Runs in a process of its own: in the test's process, hundreds of attackers waking at once would
# hold the GIL and the delay measured would be the test's, not the bridge's.
_SAMPLER = """
import json, sys, time, httpx
url, seconds = sys.argv[1], float(sys.argv[2])
latencies = []
with httpx.Client(base_url=url, timeout=10) as client:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.monotonic()
        assert client.get("/healthz").status_code == 200
        latencies.append(time.monotonic() - started)
        time.sleep(0.01)
print(json.dumps(latencies))
"""


async def healthz_latencies(url: str, seconds: float) -> list[float]:
    """GET /healthz every 10 ms for ``seconds`` from another process; the latencies, sorted."""
    sampler = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _SAMPLER, url, str(seconds), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(sampler.communicate(), seconds + 30)
    assert sampler.returncode == 0
    return sorted(json.loads(out))


def p99(ordered: list[float]) -> float:
    return ordered[math.ceil(len(ordered) * 0.99) - 1]


async def healthz_bound(url: str, seconds: float) -> float:
    """The /healthz p99 an attack must keep under: 200 ms, or twice the p99 sampled now, for
    ``seconds`` before the attack, when that is higher. On a shared machine the scheduler alone
    delays a request now and then, attack or not; a degradation by the attack still fails."""
    return max(0.2, 2 * p99(await healthz_latencies(url, seconds)))


async def healthz_while_held(
    url: str, clients: Sequence[SlowClient], attack: Awaitable[object], seconds: float
) -> list[float]:
    """/healthz latencies sampled for ``seconds`` from the moment every one of ``clients`` has
    started, while ``attack`` (their runs) goes on to its end."""
    await asyncio.wait_for(asyncio.gather(*(client.started.wait() for client in clients)), 30)
    healthz, _ = await asyncio.gather(healthz_latencies(url, seconds), attack)
    return healthz


def assert_healthz_kept_up(healthz: list[float], bound: float, at_least: int) -> None:
    """At least ``at_least`` /healthz samples were answered during the attack, with a p99 under ``bound``."""
    assert len(healthz) >= at_least, len(healthz)
    assert p99(healthz) < bound, f"/healthz p99 {p99(healthz) * 1000:.0f} ms during the attack, {bound=}"


async def wait_for_close(reader: asyncio.StreamReader, limit: float) -> tuple[float, bytes]:
    """Seconds until the bridge closed the connection, and what it wrote before."""
    started = time.monotonic()
    data = b""
    with contextlib.suppress(ConnectionError):
        while chunk := await asyncio.wait_for(reader.read(65536), limit):
            data += chunk
    return time.monotonic() - started, data
