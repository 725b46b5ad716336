"""Attacks on the request body, against a real bridge process.

Without a deadline of its own, a body trickled a byte at a time (or a chunked body's trailers)
holds its connection, and the handler waiting for the body, for as long as the client likes: the
head deadline ends where the body begins. BODY_TIMEOUT_S bounds the whole body, counted from the
end of the head.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import pytest

from tests.conftest import BridgeFactory, StubFactory
from tests.support.slow_clients import (
    SlowClient,
    assert_healthz_kept_up,
    closed_by_bridge,
    healthz_bound,
    healthz_while_held,
    wait_for_close,
)

BODY_TIMEOUT_S = 2.0
MARGIN_S = 1.5  # a close later than the deadline plus this is a failure
TRICKLE_INTERVAL_S = 0.5  # one body byte per interval: the whole body would take minutes
CHAT_PATH = b"/api/v2/bali-zero/chat"
NO_LIMITS = {"RATE_LIMIT": "100000/minute", "BODY_TIMEOUT_S": str(BODY_TIMEOUT_S)}


def post_head(*headers: bytes) -> bytes:
    lines = [b"POST " + CHAT_PATH + b" HTTP/1.1", b"Host: x", b"Content-Type: application/json", *headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


class SlowBody(SlowClient):
    """One connection that sends its request head whole, then the body a byte at a time;
    ``closed_after`` counts from the end of the head."""

    def __init__(self, head: bytes, trickled: bytes, at_once: bytes = b"") -> None:
        super().__init__()
        self.head = head
        self.at_once = at_once  # sent with the head
        self.trickled = trickled

    async def run(self, port: int, give_up_after: float) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(self.head + self.at_once)
        await writer.drain()
        head_sent_at = time.monotonic()
        self.started.set()
        async with self.reading(reader, writer, since=head_sent_at) as reading:
            for byte in self.trickled:
                await asyncio.wait({reading}, timeout=TRICKLE_INTERVAL_S)
                if reading.done() or time.monotonic() - head_sent_at > give_up_after:
                    break
                with contextlib.suppress(ConnectionError):
                    writer.write(bytes([byte]))
            await asyncio.wait({reading}, timeout=max(0, give_up_after - (time.monotonic() - head_sent_at)))


def assert_closed_at_the_deadline(attacker: SlowBody) -> None:
    lasted = attacker.closed_after
    assert lasted is not None, f"still open {BODY_TIMEOUT_S + MARGIN_S + 2} s after the head"
    assert BODY_TIMEOUT_S - 0.1 <= lasted <= BODY_TIMEOUT_S + MARGIN_S, lasted


async def test_30_connections_trickling_their_body_get_408_and_are_closed_at_body_timeout(
    bridge_factory: BridgeFactory,
) -> None:
    """The issue's attack scaled in time: 30 bodies of 1 000 bytes, one byte per half second."""
    bridge = bridge_factory(**NO_LIMITS)
    bound = await healthz_bound(bridge.url, 1.0)
    attackers = [SlowBody(post_head(b"Content-Length: 1000"), b"{" + b" " * 999) for _ in range(30)]
    attack = asyncio.gather(*(a.run(bridge.port, BODY_TIMEOUT_S + MARGIN_S + 2) for a in attackers))
    healthz = await healthz_while_held(bridge.url, attackers, attack, BODY_TIMEOUT_S + 1)

    for attacker in attackers:
        assert_closed_at_the_deadline(attacker)
        assert attacker.answers() == [
            (408, {"error": {"code": "BODY_TIMEOUT", "message": "request body not received within 2 s"}})
        ]
        assert b"connection: close" in attacker.reply.lower()
    assert_healthz_kept_up(healthz, bound, at_least=20)
    assert closed_by_bridge(bridge)["body_timeout"] == 30
    assert "Traceback" not in "\n".join(bridge.stderr_lines)


TRICKLES = {
    # Chunked framing itself, a byte at a time.
    "chunked_body": (post_head(b"Transfer-Encoding: chunked"), b"", b"3e8\r\n{" + b" " * 999),
    # The body is complete; its trailer section never is.
    "chunked_trailers": (
        post_head(b"Transfer-Encoding: chunked"),
        b'e\r\n{"query":"hi"}\r\n0\r\n',
        b"X-Trailer: " + b"t" * 100,
    ),
}


@pytest.mark.parametrize(("head", "at_once", "trickled"), TRICKLES.values(), ids=TRICKLES.keys())
async def test_chunked_body_or_trailers_trickled_get_408_at_body_timeout(
    bridge_factory: BridgeFactory, head: bytes, at_once: bytes, trickled: bytes
) -> None:
    bridge = bridge_factory(**NO_LIMITS)
    attacker = SlowBody(head, trickled, at_once)
    await attacker.run(bridge.port, BODY_TIMEOUT_S + MARGIN_S + 2)
    assert_closed_at_the_deadline(attacker)
    assert attacker.codes() == [(408, "BODY_TIMEOUT")]
    assert closed_by_bridge(bridge)["body_timeout"] == 1


async def test_body_trickled_after_an_early_413_is_cut_at_body_timeout(bridge_factory: BridgeFactory) -> None:
    """The bridge answers an oversized Content-Length at once; the body still trickling after that
    answer would keep the connection (each byte cancels the keep-alive timer) but for the deadline."""
    bridge = bridge_factory(**NO_LIMITS)
    attacker = SlowBody(post_head(b"Content-Length: 100000"), b" " * 1000)
    await attacker.run(bridge.port, BODY_TIMEOUT_S + MARGIN_S + 2)
    assert_closed_at_the_deadline(attacker)
    # The request was answered; nothing more is written into the connection.
    assert attacker.codes() == [(413, "PAYLOAD_TOO_LARGE")]
    assert closed_by_bridge(bridge)["body_timeout"] == 1


async def test_slow_body_that_completes_inside_body_timeout_is_answered(
    stub_factory: StubFactory, bridge_factory: BridgeFactory
) -> None:
    """Control: the deadline is the whole body's, not a read's; a slow but finished body is served,
    and the next request on the connection has a deadline of its own."""
    bridge = bridge_factory(stub_factory("--mode", "echo"), **NO_LIMITS)
    body = b'{"query":"slow but in time"}'
    pieces = [body[i : i + 8] for i in range(0, len(body), 8)]
    reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
    try:
        for _ in range(2):
            writer.write(post_head(b"Content-Length: %d" % len(body)))
            for piece in pieces:  # four pieces over 1.2 s: more than half the deadline
                await asyncio.sleep(0.3)
                writer.write(piece)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200 "), head
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            answer = json.loads(await asyncio.wait_for(reader.readexactly(length), 10))
            assert answer["answer"] == "slow but in time"
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        _, rest = await wait_for_close(reader, 10)
        assert rest.startswith(b"HTTP/1.1 200 ")
    finally:
        writer.close()
    assert closed_by_bridge(bridge)["body_timeout"] == 0
