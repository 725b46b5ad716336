"""The connection protocol's head accounting, in process: real sockets, a minimal ASGI app.

Fast and exact: a head of the wire limit is served and one byte more is refused, wherever in a
read the head begins. The attacks against the whole bridge are in tests/adversarial/test_request_head.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn
from uvicorn.server import ServerState

from bridge.config import ConfigError, Settings
from bridge.server.budget import SLICE_BYTES
from bridge.server.protocol import WIRE_ALLOWANCE_BYTES, ConnectionLimits, protocol_class
from bridge.types import ConnectionCloseReason

LIMIT = 8 * 1024  # wire bytes of a request head


class Closes:
    def __init__(self) -> None:
        self.reasons: list[ConnectionCloseReason] = []

    def connection_closed_by_bridge(self, reason: ConnectionCloseReason) -> None:
        self.reasons.append(reason)


async def ok_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    assert scope["type"] == "http"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


SLOW_RESPONSE_S = 1.0


async def body_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Reads the whole body before answering ``ok``; ``/slow`` answers in two parts, a second apart."""
    assert scope["type"] == "http"
    while (message := await receive())["type"] == "http.request" and message.get("more_body"):
        pass
    if message["type"] == "http.disconnect":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    if scope["path"] == "/slow":
        await send({"type": "http.response.body", "body": b"o", "more_body": True})
        await asyncio.sleep(SLOW_RESPONSE_S)
        await send({"type": "http.response.body", "body": b"k"})
    else:
        await send({"type": "http.response.body", "body": b"ok"})


@contextlib.asynccontextmanager
async def serving(limits: ConnectionLimits, app: Any = ok_app) -> AsyncIterator[tuple[int, Closes]]:
    closes = Closes()
    config = uvicorn.Config(app, lifespan="off", log_config=None)
    cls = protocol_class(limits, closes)
    state = ServerState()
    server = await asyncio.get_running_loop().create_server(
        lambda: cls(config=config, server_state=state, app_state={}), "127.0.0.1", 0
    )
    try:
        yield server.sockets[0].getsockname()[1], closes
    finally:
        for connection in list(state.connections):
            connection.transport.close()
        server.close()
        await server.wait_closed()


def head_of(size: int) -> bytes:
    """A GET head of exactly ``size`` bytes on the wire."""
    start, end = b"GET / HTTP/1.1\r\nX-Fill: ", b"\r\n\r\n"
    return start + b"f" * (size - len(start) - len(end)) + end


async def exchange(port: int, data: bytes, answers: int) -> bytes:
    """Send ``data`` in one write; read until ``answers`` responses arrived or the server closed.

    No half-close: uvicorn closes a connection at the client's EOF, dropping queued requests.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    reply = b""
    try:
        writer.write(data)
        while reply.count(b"HTTP/1.1 ") < answers or not reply.endswith((b"ok", b"}}")):
            chunk = await asyncio.wait_for(reader.read(65536), 10)
            if not chunk:
                break
            reply += chunk
        return reply
    finally:
        writer.close()


PREFIXES = {
    "fresh": b"",
    "after_content_length_body": b"POST / HTTP/1.1\r\nContent-Length: 5000\r\n\r\n" + b"b" * 5000,
    "after_two_reads_of_body": b"POST / HTTP/1.1\r\nContent-Length: 300000\r\n\r\n" + b"b" * 300_000,
}


@pytest.mark.parametrize("prefix", PREFIXES.values(), ids=PREFIXES.keys())
async def test_head_of_exactly_the_limit_is_served_one_byte_more_is_431(prefix: bytes) -> None:
    answered = prefix.count(b"HTTP/1.1")
    async with serving(ConnectionLimits(LIMIT, 10, 10, 10)) as (port, closes):
        reply = await exchange(port, prefix + head_of(LIMIT), answered + 1)
        assert reply.count(b"HTTP/1.1 200 ") == answered + 1, reply[-300:]
        assert closes.reasons == []
        reply = await exchange(port, prefix + head_of(LIMIT + 1), answered + 1)
        assert reply.count(b"HTTP/1.1 200 ") == answered
        assert reply.endswith(b'"code":"HEADERS_TOO_LARGE","message":"request head over 8192 bytes"}}'), reply[-300:]
        assert closes.reasons == ["header_too_large"]


async def test_pipelined_head_inside_a_slice_is_overcharged_by_at_most_a_slice() -> None:
    bodiless = b"GET / HTTP/1.1\r\n\r\n"
    async with serving(ConnectionLimits(LIMIT, 10, 10, 10)) as (port, closes):
        reply = await exchange(port, bodiless + head_of(LIMIT - SLICE_BYTES), 2)
        assert reply.count(b"HTTP/1.1 200 ") == 2
        reply = await exchange(port, bodiless + head_of(LIMIT + 1), 2)
        assert reply.count(b"HTTP/1.1 200 ") == 1 and b"HEADERS_TOO_LARGE" in reply
        assert closes.reasons == ["header_too_large"]


async def test_many_pipelined_requests_in_one_read_are_all_served() -> None:
    requests = head_of(200) * 500  # 100 KB of heads in one write: none is charged its neighbours
    async with serving(ConnectionLimits(LIMIT, 10, 10, 10)) as (port, closes):
        reply = await exchange(port, requests, 500)
    assert reply.count(b"HTTP/1.1 200 ") == 500
    assert closes.reasons == []


async def test_chunked_body_then_pipelined_request_is_served() -> None:
    chunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1\r\nx\r\n" * 2000 + b"0\r\n\r\n"
    async with serving(ConnectionLimits(LIMIT, 10, 10, 10)) as (port, closes):
        reply = await exchange(port, chunked + head_of(LIMIT - SLICE_BYTES), 2)
    assert reply.count(b"HTTP/1.1 200 ") == 2
    assert closes.reasons == []


async def test_silent_connection_closed_after_head_timeout_without_an_answer() -> None:
    async with serving(ConnectionLimits(LIMIT, 0.2, 10, 10)) as (port, closes):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    assert closes.reasons == ["header_timeout"]


BODY_TIMEOUT = b'{"error":{"code":"BODY_TIMEOUT","message":"request body not received within 0.3 s"}}'


async def test_body_incomplete_at_body_timeout_gets_408_and_close() -> None:
    trickled = b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\n12345"
    async with serving(ConnectionLimits(LIMIT, 10, 10, 0.3), body_app) as (port, closes):
        reply = await exchange(port, trickled, 1)
    assert reply.startswith(b"HTTP/1.1 408 Request Timeout\r\n") and reply.endswith(BODY_TIMEOUT), reply
    assert closes.reasons == ["body_timeout"]


async def test_trailers_incomplete_at_body_timeout_get_408_and_close() -> None:
    trailing = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\nX-Trailer: t"
    async with serving(ConnectionLimits(LIMIT, 10, 10, 0.3), body_app) as (port, closes):
        reply = await exchange(port, trailing, 1)
    assert reply.endswith(BODY_TIMEOUT), reply
    assert closes.reasons == ["body_timeout"]


async def test_body_pipelined_behind_a_slow_response_is_timed_only_while_read() -> None:
    """While uvicorn does not read (a request waits behind the response under way) the client is
    not the slow one: the deadline waits, and its 408 never lands inside the earlier response."""
    pipelined = b"GET /slow HTTP/1.1\r\n\r\n" + b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\n12345"
    async with serving(ConnectionLimits(LIMIT, 10, 10, 0.3), body_app) as (port, closes):
        reply = await exchange(port, pipelined, 2)
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n"), reply
    first, second = reply.split(b"HTTP/1.1 408 ")
    assert first.endswith(b"\r\n\r\nok") and second.endswith(BODY_TIMEOUT), reply
    assert closes.reasons == ["body_timeout"]


async def test_bodies_within_body_timeout_arm_no_deadline_that_outlives_them() -> None:
    """A body completed in time cancels its deadline: the keep-alive connection is not cut later."""
    complete = b"POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\nbody"
    async with serving(ConnectionLimits(LIMIT, 10, 10, 0.3), body_app) as (port, closes):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(complete[:-2])
            await asyncio.sleep(0.2)
            writer.write(complete[-2:])
            assert (await asyncio.wait_for(reader.readuntil(b"ok"), 5)).startswith(b"HTTP/1.1 200 ")
            with pytest.raises(TimeoutError):  # nothing closes it: well past the body deadline
                await asyncio.wait_for(reader.read(1), 0.6)
        finally:
            writer.close()
    assert closes.reasons == []


def test_wire_limit_is_max_header_bytes_plus_the_allowance() -> None:
    settings = Settings(max_header_bytes=32768, header_timeout_s=7.5, keepalive_timeout_s=90)
    limits = ConnectionLimits.from_settings(settings)
    assert limits == ConnectionLimits(32768 + WIRE_ALLOWANCE_BYTES, 7.5, 90, 30)


@pytest.mark.parametrize("name", ["HEADER_TIMEOUT_S", "BODY_TIMEOUT_S", "KEEPALIVE_TIMEOUT_S"])
@pytest.mark.parametrize("value", ["0", "-1", "nan", "soon"])
def test_timeouts_must_be_positive_numbers(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})
