"""Moving-window rate limit: controllable clock in memory, shared state in a real redis-server."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from bridge.config import Settings
from bridge.errors import ServiceUnavailable, TooManyRequests
from bridge.ratelimit import RateDecision, RateLimiter
from tests.support.redis import RedisFactory, redis_factory, redis_server  # noqa: F401

BASE = Settings(rate_limit="20/minute")


class FakeClock:
    """Time that moves only when the test says so."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_21st_hit_denied_with_exact_retry_after() -> None:
    clock = FakeClock()
    violations: list[tuple[str, RateDecision]] = []
    limiter = RateLimiter(BASE, clock, on_violation=lambda k, d: violations.append((k, d)))
    for i in range(20):
        decision = await limiter.hit("ip:1.2.3.4")
        assert decision.allowed and decision.remaining == 19 - i
        clock.now += 1  # hits at 1000, 1001, ... 1019
    assert clock.now == 1020.0
    denied = await limiter.hit("ip:1.2.3.4")
    # the oldest hit (1000) leaves the window just after 1060: 40 s from now, so come back in 41
    assert (denied.allowed, denied.remaining) == (False, 0)
    assert (denied.reset_after_s, denied.retry_after_s) == (40.0, 41)
    assert denied.headers() == {
        "RateLimit-Limit": "20",
        "RateLimit-Remaining": "0",
        "RateLimit-Reset": "40",
        "Retry-After": "41",
    }
    assert violations == [("ip:1.2.3.4", denied)]
    assert isinstance(denied.error(), TooManyRequests)
    assert (await limiter.hit("ip:5.6.7.8")).allowed  # other keys unaffected

    clock.now = 1060.0  # the entry stamped 1000 still counts at exactly +60 s
    assert not (await limiter.hit("ip:1.2.3.4")).allowed
    clock.now = 1020.0 + 41
    again = await limiter.hit("ip:1.2.3.4")
    assert again.allowed and again.remaining == 0  # exactly one slot freed, and we took it
    assert not (await limiter.hit("ip:1.2.3.4")).allowed
    await limiter.aclose()


async def test_fractional_retry_after_rounds_up() -> None:
    clock = FakeClock(50.25)
    limiter = RateLimiter(replace(BASE, rate_limit="1/second"), clock)
    assert (await limiter.hit("k")).allowed
    clock.now += 0.5
    denied = await limiter.hit("k")
    assert denied.reset_after_s == pytest.approx(0.5) and denied.retry_after_s == 1
    clock.now += denied.retry_after_s
    assert (await limiter.hit("k")).allowed


async def test_allowed_headers_have_no_retry_after() -> None:
    limiter = RateLimiter(BASE, FakeClock())
    headers = (await limiter.hit("k")).headers()
    assert headers == {"RateLimit-Limit": "20", "RateLimit-Remaining": "19", "RateLimit-Reset": "60"}


async def test_idle_keys_are_swept() -> None:
    clock = FakeClock()
    limiter = RateLimiter(BASE, clock)
    for i in range(100):
        await limiter.hit(f"ip:{i}")
    clock.now += 61
    await limiter.hit("ip:new")
    assert list(limiter._window._stamps) == ["ip:new"]  # type: ignore[attr-defined]


def test_clock_only_with_memory_storage() -> None:
    with pytest.raises(ValueError):
        RateLimiter(replace(BASE, rate_limit_storage="redis://127.0.0.1:1/0"), FakeClock())


@pytest.mark.redis
async def test_two_instances_share_one_window(redis_server: str) -> None:  # noqa: F811
    settings = replace(BASE, rate_limit_storage=redis_server)
    a, b = RateLimiter(settings), RateLimiter(settings)
    try:
        for i in range(20):
            decision = await (a if i % 2 else b).hit("user:shared")
            assert decision.allowed and decision.remaining == 19 - i, i
        for limiter in (a, b):
            denied = await limiter.hit("user:shared")
            assert not denied.allowed and not denied.storage_error
            assert denied.retry_after_s is not None and 59 <= denied.retry_after_s <= 61
            assert denied.reset_after_s <= denied.retry_after_s
        assert (await a.hit("user:other")).allowed
    finally:
        await a.aclose()
        await b.aclose()


@pytest.mark.redis
async def test_redis_killed_fails_open(redis_factory: RedisFactory) -> None:  # noqa: F811
    server = redis_factory()
    errors: list[BaseException] = []
    limiter = RateLimiter(replace(BASE, rate_limit_storage=server.url), on_storage_error=errors.append)
    try:
        assert not (await limiter.hit("k")).storage_error
        server.kill()
        started = time.monotonic()
        for _ in range(3):
            decision = await limiter.hit("k")
            assert decision.allowed and decision.storage_error and decision.error() is None
            assert "Retry-After" not in decision.headers()
        assert time.monotonic() - started < 3  # bounded by the storage timeout, never a hang
        assert limiter.failures_open == 3 and len(errors) == 3
    finally:
        await limiter.aclose()


@pytest.mark.redis
async def test_redis_killed_fails_closed_with_503(redis_factory: RedisFactory) -> None:  # noqa: F811
    server = redis_factory()
    settings = replace(BASE, rate_limit_storage=server.url, rate_limit_fail_open=False)
    limiter = RateLimiter(settings, storage_retry_after_s=7)
    try:
        assert (await limiter.hit("k")).allowed
        server.kill()
        decision = await limiter.hit("k")
        assert not decision.allowed and decision.storage_error and decision.retry_after_s == 7
        err = decision.error()
        assert isinstance(err, ServiceUnavailable) and err.code == "RATE_LIMIT_UNAVAILABLE"
        assert err.headers() == {"Retry-After": "7"} and decision.headers() == {"Retry-After": "7"}
        assert limiter.failures_closed == 1 and limiter.failures_open == 0
    finally:
        await limiter.aclose()


@pytest.mark.redis
async def test_limits_resume_when_redis_returns(redis_factory: RedisFactory) -> None:  # noqa: F811
    server = redis_factory()
    limiter = RateLimiter(replace(BASE, rate_limit_storage=server.url))
    try:
        server.kill()
        assert (await limiter.hit("k")).storage_error
        redis_factory(server.port)
        back = await limiter.hit("k")
        assert back.allowed and not back.storage_error and back.remaining == 19
    finally:
        await limiter.aclose()
