"""Resume across instances (RESUME_STORE=redis://): a stream started on A continues on B.

Everything is real: one redis-server, two bridge processes sharing it, the stub RAG server.
The only sleeps are the scenario's own "client away"; everything else waits on an outcome
(the stub's stream-end line, a key's disappearance).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import cast

import httpx
import pytest
import redis.asyncio

from bridge.sse import Parser
from tests.conftest import BridgeFactory, StubFactory
from tests.support.processes import Bridge, Stub
from tests.support.redis import redis_factory, redis_server  # noqa: F401  (fixtures)
from tests.support.sse_client import STREAM_PATH, StreamReply, lagging_reader, open_stream
from tests.support.workers import two_workers

pytestmark = pytest.mark.redis


@dataclass(frozen=True)
class LeftStream:
    """A stream opened on A and hung up on after its first tokens: what a resume needs."""

    stub: Stub
    a: Bridge
    b: Bridge
    words: list[str]
    first: StreamReply  # what the client read on A

    @property
    def query(self) -> str:
        return ",".join(self.words)

    @property
    def stream_id(self) -> str:
        return str(self.first.frames[0]["stream_id"])

    @property
    def request_id(self) -> str:
        return str(self.first.frames[0]["request_id"])

    @property
    def last_event_id(self) -> str:
        return self.first.events[-1].last_event_id

    async def resume(
        self,
        on: Bridge,
        last_event_id: str | None = None,
        user: str | None = None,
        stop_after_tokens: int | None = None,
    ) -> StreamReply:
        """Reconnect on ``on`` with ``Last-Event-ID`` (by default the last id read on A), as
        ``x-user-id: user`` when given."""
        headers = {"x-user-id": user} if user else {}
        headers["Last-Event-ID"] = last_event_id or self.last_event_id
        return await open_stream(
            on.url, params={"query": self.query}, headers=headers, stop_after_tokens=stop_after_tokens
        )


class Pair:
    """Two instances behind an imaginary non-sticky load balancer (same stub, same store), or one
    bridge of two workers on one port, whose every connection may reach either worker."""

    def __init__(self, stub_factory: StubFactory, bridge_factory: BridgeFactory, store: str, workers: bool) -> None:
        self.stub_factory = stub_factory
        self.bridge_factory = bridge_factory
        self.store = store
        self.workers = workers

    def __call__(self, stub: Stub, **env: str) -> tuple[Bridge, Bridge]:
        full = {"RESUME_GRACE_S": "5", "TRUSTED_PROXIES": "127.0.0.1/32", "RESUME_STORE": self.store, **env}
        if self.workers:
            one = self.bridge_factory(stub, **two_workers(self.store, **full))
            return one, one
        return self.bridge_factory(stub, **full), self.bridge_factory(stub, **full)

    async def stream_left_on_a(
        self, word: str, count: int, *, token_delay_ms: int, after_tokens: int, user: str | None = None, **env: str
    ) -> LeftStream:
        """Start an echo stub (a token per word, ``token_delay_ms`` apart) and the pair (``env`` on
        top of its own), open a stream of ``count`` words ``<word>0, <word>1, ...`` on A (as
        ``x-user-id: user`` when given) and hang up after ``after_tokens`` tokens."""
        stub = self.stub_factory("--mode", "echo", "--echo-delimiter", ",", "--token-delay-ms", str(token_delay_ms))
        a, b = self(stub, **env)
        words = [f"{word}{i}" for i in range(count)]
        headers = {"x-user-id": user} if user else None
        first = await open_stream(
            a.url, params={"query": ",".join(words)}, headers=headers, stop_after_tokens=after_tokens
        )
        return LeftStream(stub, a, b, words, first)


@pytest.fixture(params=["two instances", "two workers"])
def pair(
    request: pytest.FixtureRequest,
    stub_factory: StubFactory,
    bridge_factory: BridgeFactory,
    redis_server: str,  # noqa: F811
) -> Pair:
    return Pair(stub_factory, bridge_factory, redis_server, request.param == "two workers")


def seqs(reply: StreamReply) -> list[int]:
    return [int(e.last_event_id.rsplit(":", 1)[1]) for e in reply.events if e.type == "message"]


async def stored_end(store: redis.asyncio.Redis, stream_id: str) -> float:
    """Wait for the owner's closing flush; returns when (``time.monotonic()``) that flush's TTL
    lets the stream's frames expire if no reader holds them."""
    deadline = time.monotonic() + 10
    while True:  # the final batch (with the post-end TTL) is flushed right after the done frame
        meta = await cast(Awaitable[dict[bytes, bytes]], store.hgetall(f"bzb:meta:{stream_id}"))  # sync|async union
        if meta.get(b"end") == b"completed":
            return time.monotonic() + int(await store.pttl(f"bzb:frames:{stream_id}")) / 1000
        assert time.monotonic() < deadline, meta
        await asyncio.sleep(0.05)


async def mirrored(store: redis.asyncio.Redis, stream_id: str) -> None:
    """Wait until the owner's first flush stored the stream's meta record (it is written off the
    token path, so a client can have a token before another instance could resume it)."""
    deadline = time.monotonic() + 10
    while not await store.exists(f"bzb:meta:{stream_id}"):
        assert time.monotonic() < deadline, "the owner never mirrored the stream"
        await asyncio.sleep(0.02)


@pytest.fixture
async def store(redis_server: str) -> AsyncIterator[redis.asyncio.Redis]:  # noqa: F811
    client = redis.asyncio.Redis.from_url(redis_server)
    yield client
    await client.aclose()


async def test_reconnect_to_other_instance_continues_exactly(pair: Pair) -> None:
    left = await pair.stream_left_on_a("t", 200, token_delay_ms=5, after_tokens=10)
    first, stream_id = left.first, left.stream_id
    assert first.tokens() == [f"t{i}" for i in range(10)]
    second = await left.resume(left.b)
    assert second.status == 200
    assert second.headers["x-connection-id"] == stream_id
    assert second.tokens() == [f"t{i}" for i in range(10, 200)], "no duplicates, no gaps"
    assert second.frames[-1]["type"] == "done"
    assert second.frames[-1]["metrics"]["tokens"] == 200
    assert [f["type"] for f in second.frames].count("done") == 1
    assert all(e.last_event_id.startswith(stream_id + ":") for e in second.events)
    ids = seqs(first) + seqs(second)
    assert ids == list(range(1, len(ids) + 1)), "event ids continue across instances one by one"
    assert (await left.stub.ended(left.request_id))["outcome"] == "completed"
    # Reconnecting again with the final id: the client has everything (204 stops EventSource).
    async with httpx.AsyncClient(base_url=left.b.url) as client:
        done = await client.get(
            STREAM_PATH, params={"query": left.query}, headers={"Last-Event-ID": second.events[-1].last_event_id}
        )
        scrape = (await client.get("/metrics")).text
    assert done.status_code == 204
    if pair.workers:  # either worker may have served the resume: one scrape counts both
        assert "bridge_reconnections_total 1.0" in scrape.splitlines()
        return
    # The store's counters reach /metrics: B served one resume from Redis and A wrote the frames.
    assert "bridge_resume_store_remote_resumes_total 1.0" in scrape.splitlines()
    async with httpx.AsyncClient(base_url=left.a.url) as client:
        owner_scrape = (await client.get("/metrics")).text
    counter = "bridge_resume_store_frames_written_total"
    written = [line for line in owner_scrape.splitlines() if line.startswith(counter)]
    assert written and float(written[0].split()[-1]) >= 202  # metadata, 200 tokens, done


async def first_frame_id(client: httpx.AsyncClient, query: str) -> str:
    """Open a stream, read its first frame (the metadata) and hang up: that frame's event id."""
    async with client.stream("GET", STREAM_PATH, params={"query": query}) as response:
        parser = Parser()
        async for chunk in response.aiter_raw():
            for event in parser.feed(chunk):
                if event.type == "message":
                    return event.last_event_id
    raise AssertionError("the stream ended before its first frame")


async def test_resume_on_other_instance_right_after_the_first_frame_is_never_expired(
    stub_factory: StubFactory,
    pair: Pair,
) -> None:
    """A client reads a new stream's first frame on A, drops, and resumes on B at once, 200 times.

    Stored only by the first flush of the owner's mirror, off the token path, the stream's meta
    record could still be missing when such a resume reached B, which then answered the final,
    non-retryable STREAM_EXPIRED for a live stream.
    """
    stub = stub_factory("--mode", "echo", "--echo-delimiter", ",", "--first-token-delay-ms", "50")
    a, b = pair(stub, RATE_LIMIT="100000/minute", MAX_STREAMS_PER_USER="50")
    words = ["f0", "f1", "f2"]
    query = ",".join(words)

    async def one(on_a: httpx.AsyncClient, on_b: httpx.AsyncClient) -> dict[str, object]:
        resumed = await on_b.get(
            STREAM_PATH, params={"query": query}, headers={"Last-Event-ID": await first_frame_id(on_a, query)}
        )
        frames: list[dict[str, object]] = [
            json.loads(e.data) for e in Parser().feed(resumed.content) if e.type == "message"
        ]
        assert [f.get("text") for f in frames[:-1]] == words or frames[-1]["type"] == "error", frames
        return frames[-1]

    async with (
        httpx.AsyncClient(base_url=a.url, timeout=30) as on_a,
        httpx.AsyncClient(base_url=b.url, timeout=30) as on_b,
    ):
        finals = [await one(on_a, on_b) for _ in range(200)]  # one at a time: each resume at once
    expired = [f for f in finals if f.get("code") == "STREAM_EXPIRED"]
    assert not expired, f"{len(expired)} of {len(finals)} live streams answered STREAM_EXPIRED"
    assert [f["type"] for f in finals] == ["done"] * len(finals), finals


async def test_other_user_gets_the_unknown_stream_answer_on_other_instance(pair: Pair) -> None:
    left = await pair.stream_left_on_a("y", 100, token_delay_ms=20, after_tokens=3, user="alice")
    theirs = await left.resume(left.b, user="mallory")
    assert theirs.status == 200 and theirs.tokens() == []
    assert [f["code"] for f in theirs.frames] == ["STREAM_EXPIRED"]
    async with httpx.AsyncClient(base_url=left.b.url) as client:
        stop = await client.delete(f"{STREAM_PATH}/{left.stream_id}", headers={"x-user-id": "mallory"})
        assert stop.status_code == 404
    mine = await left.resume(left.b, user="alice")
    assert mine.tokens() == [f"y{i}" for i in range(3, 100)]


async def test_unknown_stream_on_other_instance_is_expired(
    stub_factory: StubFactory,
    pair: Pair,
) -> None:
    stub = stub_factory("--mode", "echo")
    _, b = pair(stub)
    late = await open_stream(b.url, params={"query": "q"}, headers={"Last-Event-ID": "nosuchstream:4"})
    assert late.status == 200
    assert late.frames == [
        {"type": "error", "code": "STREAM_EXPIRED", "message": late.frames[0]["message"], "retryable": False}
    ]
    assert late.events[0].last_event_id == "nosuchstream:4"


async def test_delete_on_other_instance_cancels_upstream_on_owner(pair: Pair) -> None:
    # A grace of 30 s: only the stop can end it.
    left = await pair.stream_left_on_a("z", 500, token_delay_ms=20, after_tokens=2, RESUME_GRACE_S="30")
    async with httpx.AsyncClient(base_url=left.b.url) as client:
        asked = time.time()
        r = await client.delete(f"{STREAM_PATH}/{left.stream_id}")
        assert r.status_code == 204
    end = await left.stub.ended(left.request_id)
    assert end["outcome"] == "cancelled"
    assert end["ended_at"] - asked < 2, "the stop reaches the owner over pub/sub, not by grace expiry"
    late = await left.resume(left.b)
    # Either the frames missed before the stop and then STREAM_CANCELLED, or STREAM_EXPIRED:
    # both end the stream for good.
    assert late.frames[-1]["type"] == "error" and late.frames[-1]["retryable"] is False
    assert late.frames[-1]["code"] in {"STREAM_CANCELLED", "STREAM_EXPIRED"}
    assert [f["type"] for f in late.frames].count("error") == 1


async def test_reader_on_other_instance_keeps_owner_past_grace(pair: Pair) -> None:
    # ~4 s of tokens: well past A's 1 s grace.
    left = await pair.stream_left_on_a("s", 100, token_delay_ms=40, after_tokens=2, RESUME_GRACE_S="1")
    started = time.monotonic()
    second = await left.resume(left.b)
    assert time.monotonic() - started > 2, "the read on B spanned several of A's grace windows"
    assert second.tokens() == [f"s{i}" for i in range(2, 100)]
    assert second.frames[-1]["type"] == "done"
    assert (await left.stub.ended(left.request_id))["outcome"] == "completed"


async def test_reader_leaving_other_instance_releases_owner_after_grace(pair: Pair) -> None:
    left = await pair.stream_left_on_a("r", 500, token_delay_ms=40, after_tokens=2, RESUME_GRACE_S="1")
    second = await left.resume(left.b, stop_after_tokens=5)
    reader_left = time.time()
    assert second.tokens() == [f"r{i}" for i in range(2, 7)]
    end = await left.stub.ended(left.request_id)
    assert end["outcome"] == "cancelled"
    assert 0.8 <= end["ended_at"] - reader_left < 5, "cancelled one grace window after B's reader left"


async def test_owner_keeps_streaming_past_local_buffer_cap_while_mirroring(pair: Pair) -> None:
    left = await pair.stream_left_on_a("c", 200, token_delay_ms=1, after_tokens=2, RESUME_BUFFER_FRAMES="20")
    end = await left.stub.ended(left.request_id)
    assert end["outcome"] == "completed", "frames flow to Redis, so a full local buffer is not overflow"


async def test_store_keys_expire_after_stream_end_and_grace(
    stub_factory: StubFactory,
    pair: Pair,
    store: redis.asyncio.Redis,
) -> None:
    stub = stub_factory("--mode", "echo", "--echo-delimiter", ",")
    a, _ = pair(stub, RESUME_GRACE_S="1")
    reply = await open_stream(a.url, params={"query": "k1,k2,k3"})
    assert reply.frames[-1]["type"] == "done"
    stream_id = reply.frames[0]["stream_id"]
    keys = [f"bzb:frames:{stream_id}", f"bzb:meta:{stream_id}"]
    deadline = time.monotonic() + 10
    await stored_end(store, stream_id)
    assert await store.xlen(keys[0]) == len(reply.events)
    for key in keys:
        assert 0 < await store.pttl(key) <= 2000, "after the end: grace (1 s) + 1 s"
    while await store.exists(*keys):
        assert time.monotonic() < deadline, "keys outlived their TTL"
        await asyncio.sleep(0.1)


async def test_keys_of_a_stream_that_ends_while_nobody_reads_it_expire_a_window_after_its_end(
    pair: Pair,
    store: redis.asyncio.Redis,
) -> None:
    """The client leaves, the answer then completes upstream: the keys live one window past that
    end. The owner's mirror still counted the departed reader as reading there, and re-armed the
    keys as for an attached reader until their ceiling (four windows): Redis kept every abandoned
    answer four times as long, and the owner's shutdown waited on that holder."""
    left = await pair.stream_left_on_a("e", 20, token_delay_ms=5, after_tokens=2, RESUME_GRACE_S="1")
    stream_id = left.stream_id
    assert (await left.stub.ended(left.request_id))["outcome"] == "completed"  # nobody reading
    expiry_set_at_end = await stored_end(store, stream_id)
    while await store.exists(f"bzb:frames:{stream_id}", f"bzb:meta:{stream_id}"):
        assert time.monotonic() < expiry_set_at_end + 0.5, "held past its window although nobody reads it"
        await asyncio.sleep(0.05)


async def test_reader_on_other_instance_dropping_late_from_a_finished_answer_can_still_resume(
    pair: Pair,
    store: redis.asyncio.Redis,
) -> None:
    """An ended stream's Redis keys are held a resume window from when its reader last left.

    The answer ends upstream while the client is away; it comes back to instance B, takes a token,
    drops, and comes back again, each time within RESUME_GRACE_S of leaving, until well past the
    TTL the owner gave the keys at the end. Counted only from that end (grace + 1 s, whatever
    readers did), the keys were gone under the reconnecting client: STREAM_EXPIRED for a completed
    answer, the bug the owner's registry had locally.
    """
    left = await pair.stream_left_on_a("h", 20, token_delay_ms=5, after_tokens=3, RESUME_GRACE_S="2")
    assert (await left.stub.ended(left.request_id))["outcome"] == "completed"  # nobody reads
    expiry_set_at_end = await stored_end(store, left.stream_id)
    got, last_id = left.first.tokens(), left.last_event_id
    while time.monotonic() < expiry_set_at_end + 0.5:
        await asyncio.sleep(1.4)  # the scenario: the client is away for 70 % of the window
        hop = await left.resume(left.b, last_id, stop_after_tokens=1)
        assert hop.tokens() == [left.words[len(got)]], hop.frames
        got, last_id = got + hop.tokens(), hop.events[-1].last_event_id
    await asyncio.sleep(1.4)  # away once more, now past the end's TTL
    rest = await left.resume(left.b, last_id)
    assert rest.frames[-1]["type"] == "done", rest.frames[-1]
    assert got + rest.tokens() == left.words, "no duplicates, no gaps"


@pytest.mark.parametrize("lagging_on", ["owner", "other instance"])
async def test_a_reader_lagging_behind_a_finished_answer_keeps_its_redis_keys(
    lagging_on: str,
    stub_factory: StubFactory,
    pair: Pair,
    store: redis.asyncio.Redis,
) -> None:
    """While a reader (on the owner, or on another instance) is attached to an ended stream, its
    Redis keys do not expire under it.

    The answer (3 MB) ends upstream at once while the reader, a client with a 4 KiB receive
    buffer, is far behind; it stalls past the TTL the owner gave the keys at the end, drops and
    resumes on the other instance. Held only from the moment it left, the keys had already
    expired while it was attached: STREAM_EXPIRED for the rest of a completed answer.
    """
    tokens = 3000
    stub = stub_factory("--mode", "echo", "--repeat", str(tokens))
    big = {"STREAM_WINDOW_FRAMES": "10000", "RESUME_BUFFER_BYTES": str(16 << 20)}  # upstream ends at once
    a, b = pair(stub, RESUME_GRACE_S="1", **big)
    word = "y" * 1000
    head = f"GET {STREAM_PATH}?query={word} HTTP/1.1\r\nHost: x\r\n"
    lagging, request_id = a, None
    if lagging_on != "owner":  # the stream starts on A, the lagging reader takes it over on B
        first = await open_stream(a.url, params={"query": word}, stop_after_tokens=1)
        head += f"Last-Event-ID: {first.events[-1].last_event_id}\r\n"
        lagging, request_id = b, first.frames[0]["request_id"]
        await mirrored(store, first.frames[0]["stream_id"])  # else B may not know it yet
    writer, seen, last_id = await lagging_reader(lagging.url, head)
    request_id = request_id or json.loads(_data(seen))["request_id"]  # on A: the metadata frame's
    assert (await stub.ended(request_id))["outcome"] == "completed"  # the reader is far behind
    expiry_set_at_end = await stored_end(store, last_id.rsplit(":", 1)[0])
    await asyncio.sleep(max(0.0, expiry_set_at_end + 1 - time.monotonic()))  # the scenario: it stalls past that
    writer.transport.abort()
    resumed = await open_stream(b.url, params={"query": word}, headers={"Last-Event-ID": last_id})
    assert resumed.frames[-1]["type"] == "done", resumed.frames[-1]
    first_index = resumed.frames[0]["index"]
    assert [f["index"] for f in resumed.frames[:-1]] == list(range(first_index, tokens))


def _data(seen: bytes) -> bytes:
    """The first SSE data line in raw response bytes."""
    return seen.split(b"data: ", 1)[1].split(b"\n", 1)[0]


async def test_reconnecting_forever_does_not_keep_an_ended_streams_redis_keys(
    pair: Pair,
    store: redis.asyncio.Redis,
) -> None:
    """Each reader leaving re-arms an ended stream's keys, but never past a ceiling (4 windows).

    The attack: replay an old Last-Event-ID every fifth of a window, alternately on the owner and
    on another instance. Without the ceiling every reconnect would push the keys' TTL on, and
    an attacker could keep the frames of every stream they ever opened in Redis for ever.
    """
    left = await pair.stream_left_on_a("k", 10, token_delay_ms=5, after_tokens=2, RESUME_GRACE_S="1")
    stream_id = left.stream_id
    assert (await left.stub.ended(left.request_id))["outcome"] == "completed"
    expiry_set_at_end = await stored_end(store, stream_id)
    ceiling = expiry_set_at_end - 2 + 4 * 1 + 1  # end + 4 windows + 1 s (the flush set grace + 1 s)
    keys = [f"bzb:frames:{stream_id}", f"bzb:meta:{stream_id}", f"bzb:ended:{stream_id}"]
    served = 0
    while await store.exists(*keys[:2]):
        now = time.monotonic()
        assert now < ceiling + 0.5, "an ended stream's keys outlived the ceiling"
        for key in keys:
            assert await store.pttl(key) <= (ceiling - now) * 1000 + 100, key
        again = await left.resume((left.a, left.b)[served % 2])  # the id read on A, every time
        if again.frames[-1]["type"] != "done":
            assert again.frames[-1]["code"] == "STREAM_EXPIRED", again.frames[-1]
            break
        served += 1
        await asyncio.sleep(0.2)  # the attack: back every fifth of a window
    assert time.monotonic() > expiry_set_at_end + 1, "the reconnects held the keys past the end's TTL"
    while await store.exists(*keys):
        assert time.monotonic() < ceiling + 0.5, "an ended stream's keys outlived the ceiling"
        await asyncio.sleep(0.05)
    assert served >= 3, "the client kept coming back, on both instances"
