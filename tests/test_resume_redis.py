"""Resume across instances (RESUME_STORE=redis://): a stream started on A continues on B.

Everything is real: one redis-server, two bridge processes sharing it, the stub RAG server.
The only sleeps are the scenario's own "client away"; everything else waits on an outcome
(the stub's stream-end line, a key's disappearance).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from typing import cast

import httpx
import pytest
import redis.asyncio

from tests.conftest import BridgeFactory, StubFactory
from tests.support.processes import Bridge, Stub
from tests.support.redis import redis_factory, redis_server  # noqa: F401  (fixtures)
from tests.support.sse_client import STREAM_PATH, StreamReply, open_stream

pytestmark = pytest.mark.redis


def pair(bridge_factory: BridgeFactory, stub: Stub, store: str, **env: str) -> tuple[Bridge, Bridge]:
    """Two instances behind an imaginary non-sticky load balancer: same stub, same store."""
    full = {"RESUME_GRACE_S": "5", "TRUSTED_PROXIES": "127.0.0.1/32", "RESUME_STORE": store, **env}
    return bridge_factory(stub, **full), bridge_factory(stub, **full)


def seqs(reply: StreamReply) -> list[int]:
    return [int(e.last_event_id.rsplit(":", 1)[1]) for e in reply.events if e.type == "message"]


@pytest.fixture
async def store(redis_server: str) -> AsyncIterator[redis.asyncio.Redis]:  # noqa: F811
    client = redis.asyncio.Redis.from_url(redis_server)
    yield client
    await client.aclose()


async def test_reconnect_to_other_instance_continues_exactly(
    stub_factory: StubFactory, bridge_factory: BridgeFactory, redis_server: str  # noqa: F811
) -> None:
    stub = stub_factory("--mode", "echo", "--echo-delimiter", ",", "--token-delay-ms", "5")
    a, b = pair(bridge_factory, stub, redis_server)
    query = ",".join(f"t{i}" for i in range(200))
    first = await open_stream(a.url, params={"query": query}, stop_after_tokens=10)
    assert first.tokens() == [f"t{i}" for i in range(10)]
    stream_id = first.frames[0]["stream_id"]
    second = await open_stream(b.url, params={"query": query},
                               headers={"Last-Event-ID": first.events[-1].last_event_id})
    assert second.status == 200
    assert second.headers["x-connection-id"] == stream_id
    assert second.tokens() == [f"t{i}" for i in range(10, 200)], "no duplicates, no gaps"
    assert second.frames[-1]["type"] == "done"
    assert second.frames[-1]["metrics"]["tokens"] == 200
    assert [f["type"] for f in second.frames].count("done") == 1
    assert all(e.last_event_id.startswith(stream_id + ":") for e in second.events)
    ids = seqs(first) + seqs(second)
    assert ids == list(range(1, len(ids) + 1)), "event ids continue across instances one by one"
    assert (await stub.ended(first.frames[0]["request_id"]))["outcome"] == "completed"
    # Reconnecting again with the final id: the client has everything (204 stops EventSource).
    async with httpx.AsyncClient(base_url=b.url) as client:
        done = await client.get(STREAM_PATH, params={"query": query},
                                headers={"Last-Event-ID": second.events[-1].last_event_id})
    assert done.status_code == 204


async def test_other_user_gets_404_on_other_instance(
    stub_factory: StubFactory, bridge_factory: BridgeFactory, redis_server: str  # noqa: F811
) -> None:
    stub = stub_factory("--mode", "echo", "--echo-delimiter", ",", "--token-delay-ms", "20")
    a, b = pair(bridge_factory, stub, redis_server)
    query = ",".join(f"y{i}" for i in range(100))
    first = await open_stream(a.url, params={"query": query}, headers={"x-user-id": "alice"},
                              stop_after_tokens=3)
    last_id = first.events[-1].last_event_id
    stream_id = first.frames[0]["stream_id"]
    async with httpx.AsyncClient(base_url=b.url) as client:
        r = await client.get(STREAM_PATH, params={"query": query},
                             headers={"x-user-id": "mallory", "Last-Event-ID": last_id})
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "STREAM_NOT_FOUND"
        stop = await client.delete(f"{STREAM_PATH}/{stream_id}", headers={"x-user-id": "mallory"})
        assert stop.status_code == 404
    mine = await open_stream(b.url, params={"query": query},
                             headers={"x-user-id": "alice", "Last-Event-ID": last_id})
    assert mine.tokens() == [f"y{i}" for i in range(3, 100)]


async def test_unknown_stream_on_other_instance_is_expired(
    stub_factory: StubFactory, bridge_factory: BridgeFactory, redis_server: str  # noqa: F811
) -> None:
    stub = stub_factory("--mode", "echo")
    _, b = pair(bridge_factory, stub, redis_server)
    late = await open_stream(b.url, params={"query": "q"}, headers={"Last-Event-ID": "nosuchstream:4"})
    assert late.status == 200
    assert late.frames == [{"type": "error", "code": "STREAM_EXPIRED", "message": late.frames[0]["message"],
                            "retryable": False}]
    assert late.events[0].last_event_id == "nosuchstream:4"


async def test_delete_on_other_instance_cancels_upstream_on_owner(
    stub_factory: StubFactory, bridge_factory: BridgeFactory, redis_server: str  # noqa: F811
) -> None:
    stub = stub_factory("--mode", "echo", "--echo-delimiter", ",", "--token-delay-ms", "20")
    a, b = pair(bridge_factory, stub, redis_server, RESUME_GRACE_S="30")  # only the stop can end it
    query = ",".join(f"z{i}" for i in range(500))
    first = await open_stream(a.url, params={"query": query}, stop_after_tokens=2)
    stream_id = first.frames[0]["stream_id"]
    async with httpx.AsyncClient(base_url=b.url) as client:
        asked = time.time()
        r = await client.delete(f"{STREAM_PATH}/{stream_id}")
        assert r.status_code == 204
    end = await stub.ended(first.frames[0]["request_id"])
    assert end["outcome"] == "cancelled"
    assert end["ended_at"] - asked < 2, "the stop reaches the owner over pub/sub, not by grace expiry"
    late = await open_stream(b.url, params={"query": query},
                             headers={"Last-Event-ID": first.events[-1].last_event_id})
    # Either the frames missed before the stop and then STREAM_CANCELLED, or STREAM_EXPIRED:
    # both end the stream for good.
    assert late.frames[-1]["type"] == "error" and late.frames[-1]["retryable"] is False
    assert late.frames[-1]["code"] in {"STREAM_CANCELLED", "STREAM_EXPIRED"}
    assert [f["type"] for f in late.frames].count("error") == 1


async def test_reader_on_other_instance_keeps_owner_past_grace(
    stub_factory: StubFactory, bridge_factory: BridgeFactory, redis_server: str  # noqa: F811
) -> None:
    stub = stub_factory("--mode", "echo", "--echo-delimiter", ",", "--token-delay-ms", "40")
    a, b = pair(bridge_factory, stub, redis_server, RESUME_GRACE_S="1")
    query = ",".join(f"s{i}" for i in range(100))  # ~4 s of tokens: well past A's 1 s grace
    first = await open_stream(a.url, params={"query": query}, stop_after_tokens=2)
    started = time.monotonic()
    second = await open_stream(b.url, params={"query": query},
                               headers={"Last-Event-ID": first.events[-1].last_event_id})
    assert time.monotonic() - started > 2, "the read on B spanned several of A's grace windows"
    assert second.tokens() == [f"s{i}" for i in range(2, 100)]
    assert second.frames[-1]["type"] == "done"
    assert (await stub.ended(first.frames[0]["request_id"]))["outcome"] == "completed"


async def test_reader_leaving_other_instance_releases_owner_after_grace(
    stub_factory: StubFactory, bridge_factory: BridgeFactory, redis_server: str  # noqa: F811
) -> None:
    stub = stub_factory("--mode", "echo", "--echo-delimiter", ",", "--token-delay-ms", "40")
    a, b = pair(bridge_factory, stub, redis_server, RESUME_GRACE_S="1")
    query = ",".join(f"r{i}" for i in range(500))
    first = await open_stream(a.url, params={"query": query}, stop_after_tokens=2)
    second = await open_stream(b.url, params={"query": query}, stop_after_tokens=5,
                               headers={"Last-Event-ID": first.events[-1].last_event_id})
    left = time.time()
    assert second.tokens() == [f"r{i}" for i in range(2, 7)]
    end = await stub.ended(first.frames[0]["request_id"])
    assert end["outcome"] == "cancelled"
    assert 0.8 <= end["ended_at"] - left < 5, "cancelled one grace window after B's reader left"


async def test_owner_keeps_streaming_past_local_buffer_cap_while_mirroring(
    stub_factory: StubFactory, bridge_factory: BridgeFactory, redis_server: str  # noqa: F811
) -> None:
    stub = stub_factory("--mode", "echo", "--echo-delimiter", ",", "--token-delay-ms", "1")
    a, _ = pair(bridge_factory, stub, redis_server, RESUME_BUFFER_FRAMES="20")
    query = ",".join(f"c{i}" for i in range(200))
    first = await open_stream(a.url, params={"query": query}, stop_after_tokens=2)
    end = await stub.ended(first.frames[0]["request_id"])
    assert end["outcome"] == "completed", "frames flow to Redis, so a full local buffer is not overflow"


async def test_store_keys_expire_after_stream_end_and_grace(
    stub_factory: StubFactory, bridge_factory: BridgeFactory, redis_server: str,  # noqa: F811
    store: redis.asyncio.Redis,
) -> None:
    stub = stub_factory("--mode", "echo", "--echo-delimiter", ",")
    a, _ = pair(bridge_factory, stub, redis_server, RESUME_GRACE_S="1")
    reply = await open_stream(a.url, params={"query": "k1,k2,k3"})
    assert reply.frames[-1]["type"] == "done"
    stream_id = reply.frames[0]["stream_id"]
    keys = [f"bzb:frames:{stream_id}", f"bzb:meta:{stream_id}"]
    deadline = time.monotonic() + 10
    while True:  # the final batch (with the post-end TTL) is flushed right after the done frame
        meta = await cast(Awaitable[dict[bytes, bytes]], store.hgetall(keys[1]))  # redis-py: sync|async union
        if meta.get(b"end") == b"completed":
            break
        assert time.monotonic() < deadline, meta
        await asyncio.sleep(0.05)
    assert await store.xlen(keys[0]) == len(reply.events)
    for key in keys:
        assert 0 < await store.pttl(key) <= 2000, "after the end: grace (1 s) + 1 s"
    while await store.exists(*keys):
        assert time.monotonic() < deadline, "keys outlived their TTL"
        await asyncio.sleep(0.1)
