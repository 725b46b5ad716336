"""Attacks on the request head, against a real bridge process (issue: header limit and slowloris).

Each test is named after the attack it repels. The bridge used to let httptools buffer a request
head whole before any limit was checked (200 MiB header: +223 MiB RSS), and held a connection
forever while its head trickled in, or while it sent nothing at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import BridgeFactory, StubFactory
from tests.support.processes import Bridge
from tests.support.slow_clients import (
    SlowClient,
    assert_healthz_kept_up,
    closed_by_bridge,
    healthz_bound,
    healthz_while_held,
    wait_for_close,
)
from tests.support.sse_client import open_stream

MIB = 1024 * 1024
MAX_HEADER_BYTES = 32 * 1024  # the bridge's default
FLOOD_BYTES = 200 * MIB
UVLOOP_READ_BYTES = 256 * 1024  # the most one read hands the protocol
LINGER_BYTES = 64 * 1024  # read and dropped after the 431, so that it is not lost to a reset
BRIDGE_READS = MAX_HEADER_BYTES + UVLOOP_READ_BYTES + LINGER_BYTES  # the most it reads of a flood
# What a flooding client gets accepted before the close: what the bridge reads, plus the client's
# send buffer and the bridge's receive buffer, which auto-tunes to about twice what the bridge read.
# Measured: 256-704 KiB of 1.4 MiB.
ACCEPTED_BOUND = 4 * BRIDGE_READS
HEAD_TIMEOUT_S = 2.0


# ---------------------------------------------------------------------------- helpers


def proc_status_kib(pid: int, field: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    assert match, field
    return int(match.group(1))


def reset_peak_rss(pid: int) -> None:
    """Make VmHWM (peak RSS) start again from the current RSS (Linux clear_refs, value 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@contextlib.contextmanager
def small_buffer_socket(port: int) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)  # before connect: fixes the window
    sock.settimeout(5)
    try:
        sock.connect(("127.0.0.1", port))
        yield sock
    finally:
        sock.close()


def send_until_closed(sock: socket.socket, total: int, seconds: float = 20) -> int:
    """Send ``total`` filler bytes, or until the peer closes or ``seconds`` pass; return how many the
    kernel accepted. (Without the limit the bridge takes 200 MiB slowly: the time bound keeps the
    failure an assertion on the count, not a test timeout.)"""
    chunk = b"a" * (64 * 1024)
    sent = 0
    deadline = time.monotonic() + seconds
    try:
        while sent < total and time.monotonic() < deadline:
            sent += sock.send(chunk[: total - sent])
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        pass
    return sent


def read_reply(sock: socket.socket) -> bytes:
    """Whatever the bridge wrote before closing (may be nothing when the close was a reset)."""
    data = b""
    with contextlib.suppress(ConnectionResetError, TimeoutError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


# A request head that begins after another request, in the same read as that request's end: the
# bytes of the flooding head must be counted from its first byte there too.
FLOOD_PREFIXES = {
    "fresh_connection": b"",
    "after_content_length_body": b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123456789",
    "after_chunked_body": (
        b"POST /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    ),
    "after_bodiless_request": b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
}


# ---------------------------------------------------------------------------- byte floods


@pytest.mark.parametrize("prefix", FLOOD_PREFIXES.values(), ids=FLOOD_PREFIXES.keys())
def test_200mib_header_flood_is_cut_off_at_the_limit_without_buffering(
    bridge_factory: BridgeFactory, prefix: bytes
) -> None:
    bridge = bridge_factory()
    pid = bridge.proc.pid
    reset_peak_rss(pid)
    rss_before = proc_status_kib(pid, "VmRSS")
    with small_buffer_socket(bridge.port) as sock:
        sock.sendall(prefix + b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Flood: ")
        started = time.monotonic()
        accepted = send_until_closed(sock, FLOOD_BYTES)
        elapsed = time.monotonic() - started
        reply = read_reply(sock)
    growth_kib = proc_status_kib(pid, "VmHWM") - rss_before

    assert accepted <= ACCEPTED_BOUND, accepted
    assert growth_kib < 8 * 1024, f"peak RSS grew {growth_kib} KiB while {accepted} bytes were accepted"
    assert elapsed < 10, elapsed
    # The bridge lingers after its 431 so that a reset does not destroy it: the last answer is the 431.
    last = reply.rsplit(b"HTTP/1.1 ", 1)[-1]
    assert last.startswith(b"431 "), reply[-300:]
    assert json.loads(last.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "HEADERS_TOO_LARGE"
    assert closed_by_bridge(bridge)["header_too_large"] == 1
    assert httpx.get(f"{bridge.url}/healthz", timeout=10).status_code == 200


def test_head_just_over_the_limit_gets_431_json_and_close(bridge_factory: BridgeFactory) -> None:
    """Sent whole and then read: the 431 JSON arrives before the close, nothing of the head echoed."""
    bridge = bridge_factory()
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"s" * (MAX_HEADER_BYTES + 8 * 1024) + b"\r\n\r\n"
    with small_buffer_socket(bridge.port) as sock:
        sock.sendall(head)
        reply = read_reply(sock)
    assert reply.startswith(b"HTTP/1.1 431 "), reply[:200]
    head_part, body = reply.split(b"\r\n\r\n", 1)
    assert b"connection: close" in head_part.lower()
    assert b"x-content-type-options: nosniff" in head_part.lower()
    assert json.loads(body)["error"]["code"] == "HEADERS_TOO_LARGE"
    assert b"sss" not in body


# A chunked request whose trailer section never ends: trailers are header fields that httptools
# buffers (concatenating, so quadratic in CPU) after the head was complete and no longer counted.
# Before the fix one such connection took 11 MiB in 20 s, pinned the bridge's CPU and /healthz timed out.
TRAILER_FLOODS = {
    # The app waits for the body: the connection gets the 431.
    "post_chat": (b"POST /api/v2/bali-zero/chat HTTP/1.1", True),
    # The stream may answer before the body ends: then the connection is closed without an answer.
    "get_stream": (b"GET /api/v2/bali-zero/chat-stream?query=hi HTTP/1.1", False),
}


@pytest.mark.parametrize("request_line,answered", TRAILER_FLOODS.values(), ids=TRAILER_FLOODS.keys())
def test_chunked_body_then_endless_trailer_is_cut_off_at_the_header_limit(
    stub_factory: StubFactory, bridge_factory: BridgeFactory, request_line: bytes, answered: bool
) -> None:
    bridge = bridge_factory(stub_factory("--mode", "echo"), RATE_LIMIT="100000/minute")
    pid = bridge.proc.pid
    reset_peak_rss(pid)
    rss_before = proc_status_kib(pid, "VmRSS")
    head = request_line + b"\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b'{"query":"hi"}'
    with small_buffer_socket(bridge.port) as sock:
        sock.sendall(head + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\nX-Trailer: ")
        accepted = send_until_closed(sock, FLOOD_BYTES, seconds=10)
        reply = read_reply(sock)
    growth_kib = proc_status_kib(pid, "VmHWM") - rss_before

    assert accepted <= ACCEPTED_BOUND, accepted
    assert growth_kib < 8 * 1024, f"peak RSS grew {growth_kib} KiB while {accepted} bytes were accepted"
    last = reply.rsplit(b"HTTP/1.1 ", 1)[-1]
    if answered or not reply.startswith(b"HTTP/1.1 200 "):
        assert last.startswith(b"431 "), reply[-300:]
        assert json.loads(last.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "HEADERS_TOO_LARGE"
    assert closed_by_bridge(bridge)["header_too_large"] == 1
    started = time.monotonic()
    assert httpx.get(f"{bridge.url}/healthz", timeout=10).status_code == 200
    assert time.monotonic() - started < 1
    assert "Traceback" not in "\n".join(bridge.stderr_lines)


# HTTP/1.1 pipelining behind a streamed response: uvicorn keeps reading while the stream watches
# for a disconnect and turned every queued head into a request cycle. Before the fix 2 MiB of
# pipelined GETs behind one diagnostic stream grew RSS by 15 MiB (4 MiB: 28 MiB), without bound.
PIPELINED_BYTES = 4 * MIB
QUEUE_LIMIT = 64  # requests the bridge parses ahead of the response under way


def test_thousands_of_requests_pipelined_behind_a_stream_do_not_grow_memory(bridge_factory: BridgeFactory) -> None:
    bridge = bridge_factory(RATE_LIMIT="100000/minute")
    pid = bridge.proc.pid
    reset_peak_rss(pid)
    rss_before = proc_status_kib(pid, "VmRSS")
    stream = b"GET /api/v2/bali-zero/chat-stream/diagnostic?idle_s=2 HTTP/1.1\r\nHost: x\r\n\r\n"
    small = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    flood = stream + small * (PIPELINED_BYTES // len(small))
    with small_buffer_socket(bridge.port) as sock:
        sock.settimeout(0.2)
        accepted = 0
        deadline = time.monotonic() + 2  # while the stream is still under way
        while accepted < len(flood) and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                accepted += sock.send(flood[accepted : accepted + 65536])
        growth_kib = proc_status_kib(pid, "VmHWM") - rss_before
        # Once the stream is over the queue drains and reading resumes: more than the queue is served.
        sock.settimeout(10)
        reply = b""
        while reply.count(b"HTTP/1.1 200 ") <= QUEUE_LIMIT + 100:
            chunk = sock.recv(65536)
            assert chunk, "the connection stays open"
            reply += chunk

    assert growth_kib < 4 * 1024, f"peak RSS grew {growth_kib} KiB while {accepted} bytes were accepted"
    assert b'"type":"done"' in reply, "the stream under way is answered in full"
    assert "Traceback" not in "\n".join(bridge.stderr_lines)


# ---------------------------------------------------------------------------- slow heads


class Slowloris(SlowClient):
    """One connection that sends a partial request head, then one more header byte a second;
    ``closed_after`` counts from before the connect (the bridge's timer starts when it accepts)."""

    async def run(self, port: int, deadline: float) -> None:
        connecting_at = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        self.started.set()
        async with self.reading(reader, writer, since=connecting_at) as reading:
            while not reading.done() and time.monotonic() < deadline:
                with contextlib.suppress(ConnectionError):
                    writer.write(b"z")
                await asyncio.wait({reading}, timeout=1.0)


async def test_200_slowloris_connections_are_closed_after_header_timeout_while_healthz_stays_fast(
    bridge_factory: BridgeFactory,
) -> None:
    """/healthz p99 must stay under ``healthz_bound`` while 200 connections trickle their heads."""
    timeout = 2 * HEAD_TIMEOUT_S  # long enough for ~100+ /healthz samples, so p99 is not just the max
    bridge = bridge_factory(HEADER_TIMEOUT_S=str(timeout))
    margin = 3.0
    bound = await healthz_bound(bridge.url, timeout / 2)
    attackers = [Slowloris() for _ in range(200)]
    deadline = time.monotonic() + timeout + margin + 2
    attack = asyncio.gather(*(a.run(bridge.port, deadline) for a in attackers))
    # From the moment all 200 hold a connection until after they were closed.
    healthz = await healthz_while_held(bridge.url, attackers, attack, timeout + 1)

    lasted = sorted(a.closed_after if a.closed_after is not None else float("inf") for a in attackers)
    assert lasted[-1] <= timeout + margin, f"still open or closed late: {lasted[-5:]}"
    assert lasted[0] >= timeout - 0.1, f"closed before the timeout: {lasted[:5]}"
    for attacker in attackers:
        assert attacker.codes() == [(408, "HEADER_TIMEOUT")], attacker.reply[:200]
    assert_healthz_kept_up(healthz, bound, at_least=50)
    assert closed_by_bridge(bridge)["header_timeout"] == 200


async def test_silent_connection_is_closed_after_header_timeout(bridge_factory: BridgeFactory) -> None:
    """A connection that never sends a byte is a slowloris too: closed, without an answer."""
    bridge = bridge_factory(HEADER_TIMEOUT_S=str(HEAD_TIMEOUT_S))
    reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
    try:
        waited, data = await wait_for_close(reader, HEAD_TIMEOUT_S + 5)
    finally:
        writer.close()
    assert HEAD_TIMEOUT_S - 0.1 <= waited <= HEAD_TIMEOUT_S + 2, waited
    assert data == b""
    assert closed_by_bridge(bridge)["header_timeout"] == 1


async def keepalive_connection(bridge: Bridge) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that has been answered once and is kept alive."""
    reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200 "), head
    length = int(re.search(rb"content-length: (\d+)", head, re.IGNORECASE).group(1))  # type: ignore[union-attr]
    await asyncio.wait_for(reader.readexactly(length), 10)
    return reader, writer


async def test_keepalive_connection_stalled_mid_head_is_closed_after_header_timeout(
    bridge_factory: BridgeFactory,
) -> None:
    """One byte of a next request used to cancel the keep-alive timer and hold the connection forever."""
    bridge = bridge_factory(HEADER_TIMEOUT_S=str(HEAD_TIMEOUT_S), KEEPALIVE_TIMEOUT_S="60")
    reader, writer = await keepalive_connection(bridge)
    try:
        writer.write(b"G")
        waited, data = await wait_for_close(reader, HEAD_TIMEOUT_S + 5)
    finally:
        writer.close()
    assert HEAD_TIMEOUT_S - 0.1 <= waited <= HEAD_TIMEOUT_S + 2, waited
    assert data.startswith(b"HTTP/1.1 408 "), data[:200]
    assert closed_by_bridge(bridge) == {
        "header_too_large": 0,
        "header_timeout": 1,
        "body_timeout": 0,
        "keepalive_idle": 0,
    }


async def test_idle_keepalive_connection_is_closed_after_keepalive_timeout(bridge_factory: BridgeFactory) -> None:
    bridge = bridge_factory(KEEPALIVE_TIMEOUT_S="1.5", HEADER_TIMEOUT_S="30")
    reader, writer = await keepalive_connection(bridge)
    try:
        waited, data = await wait_for_close(reader, 10)
    finally:
        writer.close()
    assert 1.4 <= waited <= 3.0, waited
    assert data == b""
    assert closed_by_bridge(bridge) == {
        "header_too_large": 0,
        "header_timeout": 0,
        "body_timeout": 0,
        "keepalive_idle": 1,
    }


async def test_stream_longer_than_both_timeouts_is_not_cut(
    stub_factory: StubFactory, bridge_factory: BridgeFactory
) -> None:
    """An open SSE response is not an idle connection, whatever the head and keep-alive timeouts."""
    stub = stub_factory("--mode", "echo", "--token-delay-ms", "300")
    bridge = bridge_factory(stub, HEADER_TIMEOUT_S="1", KEEPALIVE_TIMEOUT_S="1")
    started = time.monotonic()
    reply = await open_stream(bridge.url, params={"query": "one two three four five six seven eight"})
    assert reply.status == 200
    assert time.monotonic() - started > 2.0  # longer than both timeouts together
    assert "".join(reply.tokens()).split() == ["one", "two", "three", "four", "five", "six", "seven", "eight"]
    assert reply.frames[-1]["type"] == "done"
    assert closed_by_bridge(bridge)["header_timeout"] == 0


@pytest.mark.parametrize(("extra", "status"), [(0, 200), (1, 431)], ids=["at_limit", "one_byte_over"])
async def test_url_and_headers_at_max_header_bytes_are_still_served(
    bridge_factory: BridgeFactory, extra: int, status: int
) -> None:
    """The wire bound sits above the app's exact count: a GET URL filling MAX_HEADER_BYTES works."""
    bridge = bridge_factory()
    fixed = len(b"/healthz") + len(b"host") + len(b"x") + 4  # how the app counts URL + headers
    query = b"pad=" + b"p" * (MAX_HEADER_BYTES - fixed - 4 + extra)
    reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
    try:
        writer.write(b"GET /healthz?" + query + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 %d " % status), head
    assert closed_by_bridge(bridge)["header_too_large"] == 0
