"""bridge/headwrite.py on a real uvicorn request cycle over a socket pair, in process."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from typing import cast

import pytest
from starlette.types import Send
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from bridge.headwrite import hold_head

START = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}


class _Sink(asyncio.Protocol):
    pass


@pytest.fixture
async def cycle_and_peer() -> AsyncIterator[tuple[RequestResponseCycle, socket.socket]]:
    ours, peer = socket.socketpair()
    peer.setblocking(False)
    transport, _ = await asyncio.get_running_loop().connect_accepted_socket(_Sink, ours)
    log = logging.getLogger("test.headwrite")
    scope = {"type": "http", "method": "GET", "http_version": "1.1", "path": "/", "query_string": b""}
    cycle = RequestResponseCycle(
        scope,  # type: ignore[arg-type]
        transport,
        FlowControl(transport),
        log,
        log,
        False,
        [],
        asyncio.Event(),
        False,
        True,
        lambda: None,
    )
    yield cycle, peer
    transport.close()
    peer.close()


def _send_of(cycle: RequestResponseCycle) -> Send:
    """The server's ``send`` as the bridge sees it (uvicorn types its messages more narrowly)."""
    return cast(Send, cycle.send)


def _read(peer: socket.socket) -> bytes:
    try:
        return peer.recv(65536)
    except BlockingIOError:
        return b""


async def test_head_waits_for_the_first_body_write_and_goes_out_with_it(
    cycle_and_peer: tuple[RequestResponseCycle, socket.socket],
) -> None:
    cycle, peer = cycle_and_peer
    transport = cycle.transport
    held = hold_head(_send_of(cycle))
    assert held is not None
    await cycle.send(START)  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    assert _read(peer) == b""  # held
    await cycle.send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
    held.release()
    assert cycle.transport is transport  # no wrapper left on the path of later writes
    await asyncio.sleep(0.01)
    received = _read(peer)
    assert received.startswith(b"HTTP/1.1 200 OK\r\n") and received.endswith(b"data: 1\n\n\r\n"), received


async def test_release_without_a_body_write_still_sends_the_head(
    cycle_and_peer: tuple[RequestResponseCycle, socket.socket],
) -> None:
    cycle, peer = cycle_and_peer
    held = hold_head(_send_of(cycle))
    assert held is not None
    await cycle.send(START)  # type: ignore[arg-type]
    held.release()
    await asyncio.sleep(0.01)
    assert _read(peer).startswith(b"HTTP/1.1 200 OK\r\n")


async def test_no_hold_for_another_servers_send_or_a_started_response(
    cycle_and_peer: tuple[RequestResponseCycle, socket.socket],
) -> None:
    cycle, _ = cycle_and_peer

    async def other_send(message: object) -> None:
        return None

    assert hold_head(other_send) is None
    await cycle.send(START)  # type: ignore[arg-type]
    assert hold_head(_send_of(cycle)) is None
