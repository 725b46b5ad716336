"""Per-caller request rate limit (moving window), in memory or shared through Redis.

Two backends behind one decision type:

* ``redis://`` / ``rediss://`` (RATE_LIMIT_STORAGE): the ``limits`` library's moving-window
  strategy over its async Redis storage (URI scheme ``async+redis://``, redis-py client), so every
  bridge instance counts against the same window. ``limits`` stamps entries with ``time.time()``
  itself, so this backend always runs on the wall clock.
* ``memory://``: a small in-house moving window. ``limits``' memory storage reads ``time.time()``
  internally, which a test can only control by patching a global; owning these ~30 lines instead
  lets a clock be injected (``clock=``) and keeps the same semantics as the Lua script ``limits``
  runs in Redis (an entry stamped ``t`` counts while ``t >= now - window``).

``retry_after_s`` is ``floor(seconds until the oldest entry leaves) + 1``: an entry still counts at
exactly ``t + window``, so a plain ``ceil`` would tell a client to come back one instant too early
when the distance is a whole number, and that retry would be refused again.

When the store fails (Redis down, slow, or refusing) the decision is taken without it:
``fail_open`` (RATE_LIMIT_FAIL_OPEN, default true) allows the request, logs a warning and counts
``failures_open``; fail-closed denies with ``storage_error=True``, which ``error()`` maps to a 503
``RATE_LIMIT_UNAVAILABLE`` (not a 429: the caller did nothing wrong). Either way
``on_storage_error`` is called, so metrics can count outages.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio
from limits import RateLimitItemPerSecond
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import StorageError

from bridge.config import Settings
from bridge.errors import BridgeError, ServiceUnavailable, TooManyRequests

log = logging.getLogger(__name__)

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class RateDecision:
    """The outcome of one hit. ``storage_error`` marks a decision taken without the store."""

    allowed: bool
    limit: int
    remaining: int
    reset_after_s: float
    retry_after_s: int | None = None
    storage_error: bool = False

    def headers(self) -> dict[str, str]:
        """``RateLimit-*`` headers (IETF draft, delta seconds) and ``Retry-After`` when denied.

        A decision taken without the store knows no counts, so it carries only ``Retry-After``.
        """
        out: dict[str, str] = {}
        if not self.storage_error:
            out["RateLimit-Limit"] = str(self.limit)
            out["RateLimit-Remaining"] = str(self.remaining)
            out["RateLimit-Reset"] = str(max(0, math.ceil(self.reset_after_s)))
        if not self.allowed and self.retry_after_s is not None:
            out["Retry-After"] = str(self.retry_after_s)
        return out

    def error(self) -> BridgeError | None:
        """The error to answer a denied request with (429, or 503 when the store is down)."""
        if self.allowed:
            return None
        if self.storage_error:
            return ServiceUnavailable(
                "rate limiting is unavailable, try again shortly",
                code="RATE_LIMIT_UNAVAILABLE",
                retryable=True,
                retry_after_s=self.retry_after_s,
            )
        return TooManyRequests(
            "rate limit exceeded", code="RATE_LIMITED", retryable=True, retry_after_s=self.retry_after_s
        )


class _Window(Protocol):
    async def hit(self, key: str) -> tuple[bool, int, float]:
        """(allowed, entries now in the window, seconds until the oldest one leaves)."""
        ...

    async def aclose(self) -> None: ...


class RateLimiter:
    """``hit(key)`` counts one request for ``key`` and says whether it may proceed.

    ``rate`` is (requests, window seconds), RATE_LIMIT's by default; ``key_space`` prefixes every
    key (``<key_space>:<key>``), so limiters sharing one store never count in each other's windows:
    without it the failed-credential counter for an address and the request limit of the
    anonymous caller at that address, or a user's resumes and their chats, would be one budget.
    ``clock`` is only accepted with ``memory://`` storage (see the module docstring);
    ``storage_timeout_s`` bounds one Redis round trip so a hung Redis cannot hang requests;
    ``storage_retry_after_s`` is the hint sent when failing closed.
    """

    def __init__(
        self,
        settings: Settings,
        clock: Clock | None = None,
        *,
        rate: tuple[int, int] | None = None,
        key_space: str = "",
        on_violation: Callable[[str, RateDecision], None] | None = None,
        on_storage_error: Callable[[BaseException], None] | None = None,
        storage_timeout_s: float = 0.5,
        storage_retry_after_s: int = 5,
    ) -> None:
        self.limit, self.window_s = rate or settings.rate_limit_per_window
        self._prefix = f"{key_space}:" if key_space else ""
        self.fail_open = settings.rate_limit_fail_open
        self.on_violation = on_violation
        self.on_storage_error = on_storage_error
        self.failures_open = 0
        self.failures_closed = 0
        self._storage_down = False
        self._timeout = storage_timeout_s
        self._storage_retry_after = storage_retry_after_s
        scheme = settings.rate_limit_storage.split("://", 1)[0].lower()
        self._window: _Window
        self._in_memory = scheme == "memory"
        if scheme == "memory":
            self._window = _MemoryWindow(self.limit, self.window_s, clock or time.monotonic)
        elif scheme in {"redis", "rediss"}:
            if clock is not None:
                raise ValueError("an injected clock works only with memory:// rate-limit storage")
            self._window = _RedisWindow(settings.rate_limit_storage, self.limit, self.window_s, storage_timeout_s)
        else:
            raise ValueError(f"unsupported RATE_LIMIT_STORAGE scheme {scheme!r}")

    async def hit(self, key: str) -> RateDecision:
        """Count a request for ``key``; never raises for a storage failure (see fail_open)."""
        key = self._prefix + key
        try:
            if self._in_memory:
                # Nothing to wait for: a timeout (a timer armed and cancelled per request) would
                # be pure cost on the path to the first token.
                allowed, count, reset_after = await self._window.hit(key)
            else:
                async with asyncio.timeout(self._timeout * 2):
                    allowed, count, reset_after = await self._window.hit(key)
        except (StorageError, OSError, TimeoutError, redis.RedisError) as exc:
            return self._without_storage(exc)
        if self._storage_down:
            self._storage_down = False
            log.warning("rate-limit storage is reachable again")
        reset_after = max(0.0, reset_after)
        decision = RateDecision(
            allowed=allowed,
            limit=self.limit,
            remaining=max(0, self.limit - count),
            reset_after_s=reset_after,
            retry_after_s=None if allowed else math.floor(reset_after) + 1,
        )
        if not allowed and self.on_violation is not None:
            self.on_violation(key, decision)
        return decision

    async def aclose(self) -> None:
        await self._window.aclose()

    def _without_storage(self, exc: BaseException) -> RateDecision:
        if self.on_storage_error is not None:
            self.on_storage_error(exc)
        if not self._storage_down:  # warn once per outage, not once per request
            self._storage_down = True
            action = "allowing" if self.fail_open else "refusing"
            log.warning("rate-limit storage failed (%s); %s requests until it recovers", type(exc).__name__, action)
        if self.fail_open:
            self.failures_open += 1
            return RateDecision(True, self.limit, self.limit, 0.0, storage_error=True)
        self.failures_closed += 1
        return RateDecision(False, self.limit, 0, 0.0, retry_after_s=self._storage_retry_after, storage_error=True)


class _MemoryWindow:
    """Moving window in process memory; keeps at most ``limit`` stamps per key.

    Keys whose newest stamp has left the window are swept once per window, so one-off callers
    (scanners cycling through IPs) cannot grow the table without bound.
    """

    def __init__(self, limit: int, window_s: int, clock: Clock) -> None:
        self._limit = limit
        self._window = window_s
        self._clock = clock
        self._stamps: dict[str, deque[float]] = {}
        self._last_sweep = clock()

    async def hit(self, key: str) -> tuple[bool, int, float]:
        now = self._clock()
        horizon = now - self._window
        if now - self._last_sweep >= self._window:
            self._sweep(horizon)
            self._last_sweep = now
        stamps = self._stamps.setdefault(key, deque(maxlen=self._limit))
        while stamps and stamps[0] < horizon:
            stamps.popleft()
        allowed = len(stamps) < self._limit
        if allowed:
            stamps.append(now)
        return allowed, len(stamps), stamps[0] + self._window - now

    def _sweep(self, horizon: float) -> None:
        for key in [k for k, s in self._stamps.items() if not s or s[-1] < horizon]:
            del self._stamps[key]

    async def aclose(self) -> None:
        self._stamps.clear()


class _RedisWindow:
    """``limits``' moving window in Redis; our own connection pool so ``aclose`` can release it."""

    def __init__(self, uri: str, limit: int, window_s: int, timeout_s: float) -> None:
        self._pool = redis.asyncio.ConnectionPool.from_url(
            uri, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        # limits types its pass-through options as scalars; redis-py's Redis() takes the pool.
        storage = RedisStorage(
            "async+" + uri,
            wrap_exceptions=True,
            implementation="redispy",
            connection_pool=self._pool,  # type: ignore[arg-type]
        )
        self._strategy = MovingWindowRateLimiter(storage)
        self._item = RateLimitItemPerSecond(limit, window_s, namespace="bali-zero-bridge")

    async def hit(self, key: str) -> tuple[bool, int, float]:
        allowed = await self._strategy.hit(self._item, key)
        reset_at, remaining = await self._strategy.get_window_stats(self._item, key)
        return allowed, self._item.amount - remaining, reset_at - time.time()

    async def aclose(self) -> None:
        await self._pool.disconnect()
