"""The connection's pure pieces (bridge/server/budget.py), in process and fast.

The same invariants are driven over real sockets in tests/unit/server/test_protocol.py and against the
whole bridge in tests/adversarial/test_request_head.py; these pin the arithmetic at its edges.
"""

from __future__ import annotations

import asyncio
import json

from bridge.errors import RequestBodyTimeout, RequestHeadTooLarge
from bridge.server.budget import SLICE_BYTES, Deadline, Linger, WireBudget, content_length, error_response

LIMIT = 3 * SLICE_BYTES


def test_a_head_is_charged_every_byte_and_refused_one_past_the_limit() -> None:
    budget = WireBudget(LIMIT)
    assert budget.bytes_arrived()
    assert [budget.next_slice_size(10 * LIMIT) for _ in range(3)] == [SLICE_BYTES] * 3
    assert budget.next_slice_size(1) == 0


def test_a_content_length_body_is_not_charged_and_its_slice_ends_where_it_ends() -> None:
    budget = WireBudget(LIMIT)
    budget.next_slice_size(100)
    budget.headers_complete(5000)
    assert not budget.bytes_arrived()  # body bytes run no head deadline
    assert budget.next_slice_size(10_000) == 5000
    budget.body_parsed(5000)
    budget.message_complete()
    assert [budget.next_slice_size(10 * LIMIT) for _ in range(3)] == [SLICE_BYTES] * 3  # a fresh head


def test_a_head_begun_inside_a_slice_is_charged_the_whole_slice() -> None:
    budget = WireBudget(LIMIT)
    budget.feeding(SLICE_BYTES)
    budget.message_begun()
    budget.feeding(0)
    assert budget.head_begun
    assert [budget.next_slice_size(10 * LIMIT) for _ in range(3)] == [SLICE_BYTES, SLICE_BYTES, 0]


def test_an_endless_chunked_trailer_is_charged_like_a_head() -> None:
    budget = WireBudget(LIMIT)
    budget.headers_complete(None)
    assert not budget.head_begun
    assert [budget.next_slice_size(10 * LIMIT) for _ in range(3)] == [SLICE_BYTES] * 3
    assert budget.next_slice_size(1) == 0


def test_chunk_data_restarts_the_framing_count() -> None:
    budget = WireBudget(LIMIT)
    budget.headers_complete(None)
    for _ in range(3):
        budget.next_slice_size(10 * LIMIT)
    budget.body_parsed(1)
    assert budget.next_slice_size(10 * LIMIT) == SLICE_BYTES


def test_a_chunked_body_is_in_body_until_its_trailers_end() -> None:
    """The body deadline runs while ``in_body``: a chunked body's trailers are part of it, and its
    bytes never run the head deadline (one deadline at a time)."""
    budget = WireBudget(LIMIT)
    budget.headers_complete(None)
    budget.body_parsed(5)
    budget.next_slice_size(100)  # "0\r\nX-Trailer: ..." still arriving
    assert budget.in_body and not budget.bytes_arrived()
    budget.message_complete()
    assert not budget.in_body and budget.bytes_arrived()


def test_content_length_is_none_when_chunked_or_malformed() -> None:
    assert content_length([(b"content-length", b"12")]) == 12
    assert content_length([(b"content-length", b"12"), (b"transfer-encoding", b"chunked")]) is None
    assert content_length([(b"content-length", b"x")]) is None
    assert content_length([]) is None


def test_error_response_is_a_closing_json_answer() -> None:
    raw = error_response(RequestHeadTooLarge("too big"), [(b"server", b"bzb")])
    head, body = raw.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 431 Request Header Fields Too Large"
    assert b"server: bzb" in lines and b"connection: close" in lines
    assert f"content-length: {len(body)}".encode() in lines
    assert json.loads(body)["error"]["code"] == "HEADERS_TOO_LARGE"


def test_body_timeout_is_a_closing_408_json_answer() -> None:
    raw = error_response(RequestBodyTimeout("request body not received within 30 s"), [])
    head, body = raw.split(b"\r\n\r\n", 1)
    assert head.split(b"\r\n")[0] == b"HTTP/1.1 408 Request Timeout"
    assert b"connection: close" in head.split(b"\r\n")
    assert json.loads(body) == {"error": {"code": "BODY_TIMEOUT", "message": "request body not received within 30 s"}}


def test_a_flood_after_the_431_is_cut_off_once_the_linger_budget_is_spent() -> None:
    linger = Linger(budget_bytes=100, seconds=60)
    assert not linger.active
    loop = asyncio.new_event_loop()
    try:
        linger.start(loop, lambda: None)
        assert linger.active
        assert linger.discard(100)
        assert not linger.discard(1)
        linger.cancel()
    finally:
        loop.close()


async def test_a_deadline_rearmed_while_running_fires_once() -> None:
    fired = asyncio.Event()
    count = 0

    def expired() -> None:
        nonlocal count
        count += 1
        fired.set()

    deadline = Deadline(asyncio.get_running_loop(), 0.01, expired)
    deadline.arm()
    deadline.arm()  # a later byte of the same head does not push the deadline back
    await asyncio.wait_for(fired.wait(), 5)
    await later_than(0.05)  # any second handle would have fired by now
    assert count == 1


async def test_a_cancelled_deadline_never_fires() -> None:
    fired: list[bool] = []
    deadline = Deadline(asyncio.get_running_loop(), 0.01, lambda: fired.append(True))
    deadline.arm()
    deadline.cancel()
    await later_than(0.05)
    assert fired == []


async def later_than(seconds: float) -> None:
    """Wait for a timer armed after the one under test: the loop fires timers in deadline order."""
    done = asyncio.Event()
    asyncio.get_running_loop().call_later(seconds, done.set)
    await asyncio.wait_for(done.wait(), 5)
