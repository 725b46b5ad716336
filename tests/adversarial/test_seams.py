"""Regression tests for the attacks on the seams between features, each named after its attack.

Everything runs for real on loopback: bridge processes, the stub RAG server or a RAG server that
breaks its contract on request (tests/support/hostile_rag.py), a redis-server for the shared
resume store. Each test failed on the code before its fix (checked by reverting the fix and
running it).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis.asyncio

from bridge.resume.keys import meta_key, owner_tag
from bridge.stream.frames import MAX_SOURCES
from tests.conftest import BridgeFactory
from tests.support.hostile_rag import EMPTY_SOURCES_FLOOD, NON_FINITE_SCORES, UNSET_TOKEN_INDEX, HostileRag
from tests.support.recording_rag import RecordingStub
from tests.support.redis import redis_factory, redis_server  # noqa: F401  (fixtures)
from tests.support.sse_client import STREAM_PATH, open_stream

CHAT_PATH = "/api/v2/bali-zero/chat"


@pytest.fixture(scope="module")
def hostile_rag() -> Iterator[HostileRag]:
    rag = HostileRag()
    yield rag
    rag.stop()


def _strict_json(text: str) -> Any:
    """JSON as a browser's ``JSON.parse`` reads it: ``NaN`` and ``Infinity`` are not JSON."""

    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


# -- trailer fields of a chunked body -------------------------------------------------------------


def _raw_exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` in one write (so the bridge parses the trailer before it routes) and read
    the whole answer (the request says ``Connection: close``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def _chunked_chat(trailer: str) -> bytes:
    body = b'{"query":"hi"}'
    return (
        b"POST /api/v2/bali-zero/chat HTTP/1.1\r\nHost: bridge\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        + f"{len(body):x}\r\n".encode()
        + body
        + b"\r\n0\r\n"
        + trailer.encode()
        + b"\r\n\r\n"
    )


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


@pytest.mark.parametrize(
    "trailer",
    ["X-Forwarded-For: 6.6.6.6", "x-user-id: victim"],
    ids=["x-forwarded-for", "x-user-id"],
)
async def test_chunked_trailer_field_is_not_read_as_a_header(
    echo_stub: Any, bridge_factory: BridgeFactory, trailer: str
) -> None:
    """The trailer of a chunked body arrives after the head a trusted proxy rewrote: read as a
    header, ``X-Forwarded-For: 6.6.6.6`` became the right-most hop (another rate-limit bucket, a
    forged IP in the audit trail) and ``x-user-id`` the identity the proxy had cleared."""
    bridge = bridge_factory(echo_stub, RATE_LIMIT="1/minute", TRUSTED_PROXIES="127.0.0.1/32")
    first = await asyncio.to_thread(_raw_exchange, bridge.port, _chunked_chat("X-Padding: 1"))
    assert _status(first) == 200, first
    second = await asyncio.to_thread(_raw_exchange, bridge.port, _chunked_chat(trailer))
    assert _status(second) == 429, "the trailer chose another caller's bucket: " + second.decode(errors="replace")
    # The id echoed in the answer is the head's, never a trailer's.
    third = await asyncio.to_thread(
        _raw_exchange,
        bridge.port,
        _chunked_chat("X-Request-Id: from-the-trailer").replace(
            b"Host: bridge\r\n", b"Host: bridge\r\nx-user-id: u\r\n"
        ),
    )
    assert _status(third) == 200 and b"from-the-trailer" not in third, third


# -- a RAG service off its contract ---------------------------------------------------------------


async def test_rag_source_score_nan_or_infinity_is_sent_as_json_numbers(
    hostile_rag: HostileRag, bridge_factory: BridgeFactory
) -> None:
    """A ``double`` score of NaN or ±Infinity was written as ``NaN``/``Infinity``: not JSON, so
    ``JSON.parse`` in the browser failed the metadata frame (``bad_frame``: the whole answer
    lost) and the unary answer's body. Now every score is a finite number in the same order."""
    bridge = bridge_factory(RAG_TARGET=hostile_rag.target)
    reply = await open_stream(bridge.url, params={"query": NON_FINITE_SCORES})
    metadata = [e.data for e in reply.events if '"type":"metadata"' in e.data]
    assert len(metadata) == 1, reply.events
    scores = [s["score"] for s in _strict_json(metadata[0])["sources"]]
    assert scores == [0.0, 1.7976931348623157e308, -1.7976931348623157e308, 1.5]
    assert reply.tokens() == ["one ", "two ", "three"] and reply.frames[-1]["type"] == "done"
    async with httpx.AsyncClient(base_url=bridge.url) as client:
        unary = await client.post(CHAT_PATH, json={"query": NON_FINITE_SCORES})
    assert unary.status_code == 200
    assert [s["score"] for s in _strict_json(unary.text)["sources"]] == scores


async def test_rag_token_index_left_unset_does_not_repeat_index_zero(
    hostile_rag: HostileRag, bridge_factory: BridgeFactory
) -> None:
    """proto3 sends an index never set as 0: every token frame said ``"index":0`` and the browser
    client, which drops a token whose index it has seen (its dedupe after a resume), showed the
    first token only. The frame's index is the bridge's own count: 0, 1, 2 whatever the RAG says."""
    bridge = bridge_factory(RAG_TARGET=hostile_rag.target)
    reply = await open_stream(bridge.url, params={"query": UNSET_TOKEN_INDEX})
    tokens = [f for f in reply.frames if f["type"] == "token"]
    assert [(t["index"], t["text"]) for t in tokens] == [(0, "one "), (1, "two "), (2, "three")]


async def test_rag_metadata_flooded_with_empty_sources_is_cut_to_max_sources(
    hostile_rag: HostileRag, bridge_factory: BridgeFactory
) -> None:
    """1.5 million empty sources fit one 4 MiB metadata message (2 bytes each) and became a 51 MB
    frame built on the event loop: every other request waited ~4 s and the bridge grew by
    650 MB, for each such answer. The client is shown the first ``MAX_SOURCES`` (best first)."""
    bridge = bridge_factory(RAG_TARGET=hostile_rag.target)
    reply = await open_stream(bridge.url, params={"query": EMPTY_SOURCES_FLOOD})
    metadata = [f for f in reply.frames if f["type"] == "metadata"]
    assert len(metadata) == 1 and len(metadata[0]["sources"]) == MAX_SOURCES
    assert reply.frames[-1]["type"] == "done"
    async with httpx.AsyncClient(base_url=bridge.url, timeout=30) as client:
        unary = await client.post(CHAT_PATH, json={"query": EMPTY_SOURCES_FLOOD})
    assert unary.status_code == 200 and len(unary.json()["sources"]) == MAX_SOURCES


# -- a damaged resume record ----------------------------------------------------------------------

DAMAGED_RECORDS = {
    "request_id-not-utf8": {b"request_id": b"\xff\xfe", b"last_seq": b"3"},
    "last_seq-not-an-integer": {b"last_seq": b"abc"},
    "final_seq-not-an-integer": {b"final_seq": b"1e9"},
    "owner-not-utf8": {b"owner": b"\xff"},
}


@pytest.mark.redis
@pytest.mark.parametrize("damage", list(DAMAGED_RECORDS))
async def test_damaged_resume_record_in_redis_is_expired_not_500(
    echo_stub: Any,
    bridge_factory: BridgeFactory,
    redis_server: str,  # noqa: F811
    damage: str,
) -> None:
    """A meta record with bytes that are not UTF-8 or a seq that is not an integer (written by
    anything else with access to the store, or damaged) raised in the reader: the reconnect and
    the cancel of that id answered 500 with a traceback. Now it is an unknown stream: the
    reconnect gets STREAM_EXPIRED, the cancel 404, and a warning is logged."""
    bridge = bridge_factory(echo_stub, RESUME_STORE=redis_server, RESUME_GRACE_S="10", LOG_LEVEL="WARNING")
    stream_id = "damaged" + hashlib.sha256(damage.encode()).hexdigest()[:8]
    record = {b"owner": owner_tag("ip:127.0.0.1").encode(), **DAMAGED_RECORDS[damage]}  # the caller's own
    store = redis.asyncio.Redis.from_url(redis_server)
    try:
        await store.hset(meta_key(stream_id), mapping=record)  # type: ignore[misc]
    finally:
        await store.aclose()
    reply = await open_stream(bridge.url, params={"query": "hi"}, headers={"last-event-id": f"{stream_id}:1"})
    assert reply.status == 200 and [f["code"] for f in reply.frames] == ["STREAM_EXPIRED"], reply
    async with httpx.AsyncClient(base_url=bridge.url) as client:
        cancel = await client.delete(f"{STREAM_PATH}/{stream_id}")
    assert cancel.status_code == 404 and cancel.json()["error"]["code"] == "STREAM_NOT_FOUND", cancel.text
    await asyncio.to_thread(bridge.wait_for_line, lambda line: "cannot be read" in line, 10, stderr=True)
    assert "Traceback" not in "\n".join(bridge.stderr_lines)


# -- the caller's optional fields -----------------------------------------------------------------


async def test_user_email_with_trailing_line_feed_is_400_not_forwarded(bridge_factory: BridgeFactory) -> None:
    """``re.match`` with ``$`` accepts the text followed by one "\\n": ``a@b.example\\n`` passed the
    address check and reached the RAG service with its line break (a forged line in its logs)."""
    rag = RecordingStub("--mode", "echo")
    try:
        bridge = bridge_factory(RAG_TARGET=rag.target)
        async with httpx.AsyncClient(base_url=bridge.url) as client:
            for path in (CHAT_PATH, STREAM_PATH):
                refused = await client.post(path, json={"query": "hi", "user_email": "a@b.example\n"})
                assert refused.status_code == 400, refused.text
                assert "user_email" in refused.json()["error"]["message"]
                role = await client.post(path, json={"query": "hi", "user_role": "member\n"})
                assert role.status_code == 400 and "user_role" in role.json()["error"]["message"], role.text
            served = await client.post(
                CHAT_PATH, json={"query": "hi", "user_email": "a@b.example"}, headers={"x-request-id": "ok-email"}
            )
            assert served.status_code == 200
        assert (await asyncio.to_thread(rag.wait_for_request, "ok-email"))["user_email"] == "a@b.example"
        assert [r["request_id"] for r in rag.requests()] == ["ok-email"], "nothing refused reached the RAG service"
    finally:
        rag.stop()
