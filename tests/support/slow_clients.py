"""Probes for the connection attacks (tests/adversarial/test_request_head.py, tests/adversarial/test_request_body.py).

The bridge's own count of the connections it closed, /healthz latency sampled from another
process while attackers hold connections, and the time until the bridge closes a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import sys
import time

import httpx

from tests.support.processes import Bridge


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


async def wait_for_close(reader: asyncio.StreamReader, limit: float) -> tuple[float, bytes]:
    """Seconds until the bridge closed the connection, and what it wrote before."""
    started = time.monotonic()
    data = b""
    with contextlib.suppress(ConnectionError):
        while chunk := await asyncio.wait_for(reader.read(65536), limit):
            data += chunk
    return time.monotonic() - started, data
