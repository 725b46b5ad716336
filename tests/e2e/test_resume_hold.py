"""How long the shared resume store holds an ended stream's keys (``ResumeStore.hold_ended``).

In-process and fast: the timings are pure, and the hold script runs on a real redis-server
(no bridge processes). The end-to-end scenarios are in tests/e2e/test_resume_redis.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio

from bridge.resume.client import ResumeStore, Timings
from bridge.stream.source import ENDED_HOLD_WINDOWS, StreamPolicy
from tests.support.redis import redis_factory, redis_server  # noqa: F401  (fixtures)


def policy(grace_s: float) -> StreamPolicy:
    return StreamPolicy(
        heartbeat_interval_s=15,
        send_timeout_s=30,
        resume_grace_s=grace_s,
        window_frames=64,
        buffer_frames=1000,
        buffer_bytes=1 << 20,
    )


@pytest.mark.parametrize("grace_s", [0.2, 1, 30])
def test_an_ended_stream_is_held_at_most_four_windows_and_never_less_than_its_end_ttl(grace_s: float) -> None:
    timings = Timings.from_policy(policy(grace_s), ttl_margin_s=5, op_timeout_s=1)
    assert timings.end_ttl_s == grace_s + 1
    assert timings.end_hold_max_s == grace_s * ENDED_HOLD_WINDOWS + 1
    assert timings.end_hold_max_s >= timings.end_ttl_s, "the ceiling never cuts the TTL set at the end"


FRAMES, META, ENDED = "bzb:frames:s1", "bzb:meta:s1", "bzb:ended:s1"


@pytest.fixture
async def client(redis_server: str) -> AsyncIterator[redis.asyncio.Redis]:  # noqa: F811
    client = redis.asyncio.Redis.from_url(redis_server)
    yield client
    await client.aclose()


@pytest.fixture
async def store(redis_server: str) -> AsyncIterator[ResumeStore]:  # noqa: F811
    store = ResumeStore(redis_server, policy(2), on_cancel=lambda stream_id: None)  # end TTL 3 s
    yield store
    await store.aclose()


async def stored(client: redis.asyncio.Redis, *, frames_ms: int, ended_ms: int | None) -> None:
    """The keys of stream ``s1`` as an owner leaves them (``ended_ms``: its ended key's PTTL)."""
    pipe = client.pipeline(transaction=False)
    pipe.xadd(FRAMES, {"d": b"x"}, id="1-0")
    pipe.pexpire(FRAMES, frames_ms)
    pipe.hset(META, mapping={"owner": "o", "last_seq": 1})
    pipe.pexpire(META, frames_ms)
    if ended_ms is not None:
        pipe.set(ENDED, b"1", px=ended_ms)
    await pipe.execute()


@pytest.mark.redis
async def test_a_reader_leaving_an_ended_stream_holds_its_keys_a_window_from_now(
    store: ResumeStore, client: redis.asyncio.Redis
) -> None:
    await stored(client, frames_ms=500, ended_ms=9000)
    assert await store.hold_ended("s1") == 3000
    for key in (FRAMES, META):
        assert 2900 < await client.pttl(key) <= 3000, key


@pytest.mark.redis
async def test_holding_a_running_stream_changes_nothing(store: ResumeStore, client: redis.asyncio.Redis) -> None:
    """No ended key: the owner still runs and refreshes the TTL itself (or has crashed: then the
    keys must expire as it left them)."""
    await stored(client, frames_ms=500, ended_ms=None)
    assert await store.hold_ended("s1") == 0
    assert await client.pttl(FRAMES) <= 500
    assert not await client.exists(ENDED), "the hold never creates the ended key"


@pytest.mark.redis
async def test_a_hold_never_reaches_past_the_ceiling(store: ResumeStore, client: redis.asyncio.Redis) -> None:
    await stored(client, frames_ms=500, ended_ms=1200)
    held = await store.hold_ended("s1")
    assert held is not None and 1100 < held <= 1200
    for key in (FRAMES, META):
        assert 1100 < await client.pttl(key) <= 1200, key


@pytest.mark.redis
async def test_a_hold_never_shortens_another_readers_window(store: ResumeStore, client: redis.asyncio.Redis) -> None:
    await stored(client, frames_ms=8000, ended_ms=9000)
    await store.hold_ended("s1")
    assert await client.pttl(FRAMES) > 7000


@pytest.mark.redis
async def test_an_ended_key_without_ttl_holds_nothing(store: ResumeStore, client: redis.asyncio.Redis) -> None:
    """A tampered ended key (no expiry) must not become a way to keep the frames for ever."""
    await stored(client, frames_ms=500, ended_ms=9000)
    await client.persist(ENDED)
    assert await store.hold_ended("s1") == 0
    assert await client.pttl(FRAMES) <= 500
