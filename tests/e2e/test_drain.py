"""SIGTERM drains every stream an instance serves, and its audit trail loses no record of them.

Real processes throughout: the stub, bridges sharing a real redis-server (RESUME_STORE), SIGTERM
sent to the bridge process, its audit store read back with ``bali-zero-bridge audit export`` once
it exited.

The defect these replay: a drain that waits only for the streams with an open connection. A
stream detached inside its resume window was then killed within a fraction of a second of
SIGTERM; the resume store closed before its end was mirrored, so a client reading it on another
instance got a final STREAM_EXPIRED instead of the retryable SHUTTING_DOWN, and a stop sent there
found no owner listening (503); and its end record reached an audit trail that had already closed
(``AUDIT EVENTS DROPPED``).
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import BridgeFactory, StubFactory
from tests.support.audit import exported, unended
from tests.support.processes import Bridge, Stub
from tests.support.redis import redis_factory, redis_server
from tests.support.sse_client import STREAM_PATH, StreamReply, open_stream

__all__ = ["redis_factory", "redis_server"]  # fixtures used by this module

GRACE_S = 3.0
PACED = ("--mode", "echo", "--echo-delimiter", ",", "--token-delay-ms", "50")
LONG = [f"d{i}" for i in range(400)]  # 20 s of tokens: only the drain ends them in time
SHORT = [f"s{i}" for i in range(100)]  # 5 s: finishes on the other instance after the drain
UNLIMITED = {"RATE_LIMIT": "100000/minute", "MAX_STREAMS_PER_USER": "50"}


def instance(bridge_factory: BridgeFactory, stub: Stub, db: Path, store: str | None = None, **env: str) -> Bridge:
    shared = {"RESUME_GRACE_S": "30", "SHUTDOWN_GRACE_S": str(GRACE_S), "AUDIT_DB": str(db), **UNLIMITED}
    if store is not None:
        shared["RESUME_STORE"] = store
    return bridge_factory(stub, **{**shared, **env})


def last_id(reply: StreamReply) -> str:
    return reply.events[-1].last_event_id


def assert_shutting_down(reply: StreamReply) -> None:
    """The stream's one final frame: the retryable SHUTTING_DOWN, whose id a resume continues from."""
    final = reply.frames[-1]
    assert (final["type"], final.get("code"), final.get("retryable")) == ("error", "SHUTTING_DOWN", True), final
    assert [f["type"] for f in reply.frames].count("error") == 1


async def sigterm(bridge: Bridge) -> tuple[float, int]:
    """SIGTERM the bridge process; (wall-clock time it was sent, exit code)."""
    sent = time.time()
    bridge.signal(signal.SIGTERM)
    return sent, await asyncio.to_thread(bridge.wait, 30)


def assert_no_record_dropped(bridge: Bridge) -> None:
    """The exited bridge logged no audit drop (read up to the lifespan's last line, LOG_LEVEL=INFO)."""
    bridge.wait_for_line(lambda line: "Application shutdown complete" in line, stderr=True)
    dropped = [line for line in bridge.stderr_lines if "AUDIT EVENTS DROPPED" in line]
    assert not dropped, dropped


async def reading(base_url: str, words: list[str], headers: dict[str, str] | None = None) -> asyncio.Task[StreamReply]:
    """A client reading a stream to its end, returned once its first token arrived."""
    started = asyncio.Event()
    read = asyncio.create_task(
        open_stream(base_url, params={"query": ",".join(words)}, headers=headers, first_token=started, timeout=60)
    )
    waiting = asyncio.create_task(started.wait())
    await asyncio.wait({read, waiting}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    assert started.is_set(), read.result() if read.done() else "no token within 15 s"
    return read


@pytest.mark.redis
@pytest.mark.parametrize("connections_on_a", [True, False], ids=["every-kind-at-once", "no-connection-open-on-a"])
async def test_sigterm_with_attached_detached_and_remote_read_streams_loses_no_audit_record(
    stub_factory: StubFactory, bridge_factory: BridgeFactory, redis_server: str, tmp_path: Path, connections_on_a: bool
) -> None:
    """Instance A is stopped while it owns a stream nobody reads (detached in its resume window)
    and one read on instance B; with ``connections_on_a`` also one read on A (attached) and one of
    B's that A reads from the store. Each gets the grace, ends with a retryable SHUTTING_DOWN a
    resume can read, and A's audit trail holds the end of every stream it started.

    Without a connection open on A nothing held its shutdown: the detached streams were killed at
    once and their ends lost, and B's reader got STREAM_EXPIRED when the meta record expired."""
    stub = stub_factory(*PACED)
    a = instance(bridge_factory, stub, tmp_path / "a.sqlite3", redis_server, LOG_LEVEL="INFO", RESUME_GRACE_S="10")
    b = instance(bridge_factory, stub, tmp_path / "b.sqlite3", redis_server, RESUME_GRACE_S="10")
    query = {"query": ",".join(LONG)}

    attached = await reading(a.url, LONG) if connections_on_a else None
    detached = await open_stream(a.url, params=query, stop_after_tokens=3)
    handed = await open_stream(a.url, params=query, stop_after_tokens=2)
    read_on_b = await reading(b.url, LONG, {"Last-Event-ID": last_id(handed)})
    if connections_on_a:
        theirs = await open_stream(b.url, params={"query": ",".join(SHORT)}, stop_after_tokens=2)
        read_on_a = await reading(a.url, SHORT, {"Last-Event-ID": last_id(theirs)})
    owned_by_a = [r.frames[0]["request_id"] for r in (detached, handed)]

    signalled, code = await sigterm(a)
    assert code == 0, a.output()
    assert time.time() - signalled < GRACE_S + 5, "the drain is bounded by the grace"
    attached_reply = await attached if attached is not None else None
    if attached_reply is not None:
        owned_by_a.append(attached_reply.frames[0]["request_id"])

    # A's audit trail: the end of every stream A started, none dropped.
    assert_no_record_dropped(a)
    records = exported(tmp_path / "a.sqlite3")
    assert {r["request_id"] for r in records if r["event_type"] == "stream_started"} == set(owned_by_a)
    lost = unended(records)
    assert not lost, f"{len(lost)} of {len(owned_by_a)} streams have no end record"
    ends = [r for r in records if r["event_type"] == "stream_failed"]
    assert sorted(r["request_id"] for r in ends) == sorted(owned_by_a)
    assert {r["error_code"] for r in ends} == {"SHUTTING_DOWN"}

    # Every stream A owned ran for the grace, the detached one included, then was cancelled upstream.
    for request_id in owned_by_a:
        end = await stub.ended(request_id)
        assert end["outcome"] == "cancelled"
        assert end["ended_at"] - signalled > GRACE_S - 0.5, "ended before the shutdown grace was over"

    # Each reader got the retryable SHUTTING_DOWN as its final frame, never STREAM_EXPIRED.
    if attached_reply is not None:
        assert_shutting_down(attached_reply)
    on_b = await read_on_b
    assert_shutting_down(on_b)
    assert handed.tokens() + on_b.tokens() == LONG[: len(handed.tokens() + on_b.tokens())]
    # The detached stream's tail, and the SHUTTING_DOWN that ended it, wait in the store.
    rest = await open_stream(b.url, params=query, headers={"Last-Event-ID": last_id(detached)})
    assert_shutting_down(rest)
    assert detached.tokens() + rest.tokens() == LONG[: len(detached.tokens() + rest.tokens())]
    assert len(rest.tokens()) > 20, "the detached stream kept running through the grace"
    if connections_on_a:
        # A's reader of B's stream ended at its last frame delivered: the client resumes on B, gap-free.
        on_a = await read_on_a
        assert_shutting_down(on_a)
        tail = await open_stream(b.url, params={"query": ",".join(SHORT)}, headers={"Last-Event-ID": last_id(on_a)})
        assert tail.frames[-1]["type"] == "done", tail.frames[-1]
        assert theirs.tokens() + on_a.tokens() + tail.tokens() == SHORT


async def test_sigterm_ends_a_detached_stream_nobody_can_resume_at_once_and_records_its_end(
    stub_factory: StubFactory, bridge_factory: BridgeFactory, tmp_path: Path
) -> None:
    """Without a resume store nobody can read a detached stream once the listener is closed: the
    drain ends it at once (its upstream is cancelled) and its end record is written."""
    stub = stub_factory(*PACED)
    bridge = instance(bridge_factory, stub, tmp_path / "audit.sqlite3", LOG_LEVEL="INFO")
    detached = await open_stream(bridge.url, params={"query": ",".join(LONG)}, stop_after_tokens=3)
    request_id = detached.frames[0]["request_id"]
    signalled, code = await sigterm(bridge)
    assert code == 0, bridge.output()
    end = await stub.ended(request_id)
    assert end["outcome"] == "cancelled"
    assert end["ended_at"] - signalled < GRACE_S - 1, "an unreadable stream is not kept for the grace"
    assert_no_record_dropped(bridge)
    records = exported(tmp_path / "audit.sqlite3")
    assert [(r["event_type"], r.get("error_code")) for r in records if r["request_id"] == request_id] == [
        ("stream_started", None),
        ("stream_failed", "SHUTTING_DOWN"),
    ]


@pytest.mark.redis
async def test_delete_on_other_instance_during_owners_drain_stops_the_stream_with_204(
    stub_factory: StubFactory, bridge_factory: BridgeFactory, redis_server: str, tmp_path: Path
) -> None:
    """A stop sent while the owner drains still stops the stream: 204, upstream cancelled at once,
    STREAM_CANCELLED for a later resume. Once the owner exited, a stop of that stream (over by
    then) is 204 too, not a retryable 503 OWNER_UNREACHABLE for a stream that had stopped."""
    stub = stub_factory(*PACED)
    a = instance(bridge_factory, stub, tmp_path / "a.sqlite3", redis_server, LOG_LEVEL="INFO", SHUTDOWN_GRACE_S="20")
    b = instance(bridge_factory, stub, tmp_path / "b.sqlite3", redis_server)
    detached = await open_stream(a.url, params={"query": ",".join(LONG)}, stop_after_tokens=3)
    stream_id, request_id = detached.frames[0]["stream_id"], detached.frames[0]["request_id"]

    a.signal(signal.SIGTERM)
    a.wait_for_line(lambda line: "Shutting down" in line, stderr=True)  # uvicorn runs its shutdown
    async with httpx.AsyncClient(base_url=b.url, timeout=10) as client:
        asked = time.time()
        stop = await client.delete(f"{STREAM_PATH}/{stream_id}")
        assert stop.status_code == 204, stop.text
        end = await stub.ended(request_id)
        assert end["outcome"] == "cancelled"
        assert end["ended_at"] - asked < 2, "stopped by the stop, not by the end of the drain"
        assert await asyncio.to_thread(a.wait, 10) == 0, "with its last stream stopped, the drain is over"
        again = await client.delete(f"{STREAM_PATH}/{stream_id}")
        assert again.status_code == 204, again.text
    late = await open_stream(b.url, params={"query": "q"}, headers={"Last-Event-ID": last_id(detached)})
    assert late.frames[-1]["code"] == "STREAM_CANCELLED" and late.frames[-1]["retryable"] is False
    assert_no_record_dropped(a)
    records = exported(tmp_path / "a.sqlite3")
    assert [r["event_type"] for r in records if r["request_id"] == request_id] == [
        "stream_started",
        "stream_cancelled",
    ]
