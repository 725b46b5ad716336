"""Stream caps shared through Redis: one MAX_STREAMS_PER_USER budget per identity for every worker
and instance, and one MAX_STREAMS_TOTAL per server (all its workers).

Used when RATE_LIMIT_STORAGE is ``redis://``. With the caps in process memory each worker (or
instance) granted its own budget: three streams per user became three per worker.

Layout (every key expires on its own, so a crashed process leaves nothing behind for long):

``bzb:caps:user:{sha256(identity key)}``
    sorted set of the identity's open streams: member = lease id, score = expiry in ms of Redis
    time. No user id or IP in clear, and a key's length does not depend on the caller.
``bzb:caps:total:{server id}``
    the same for every stream of one server (the supervisor's id, shared by its workers).

A lease is taken by one Lua script (expired members dropped, both counts checked, both members
added: atomic, so two workers racing for a user's last slot cannot both get it) and given back by
``ZREM``. While open it is refreshed every third of ``lease_ttl_s``; a worker that dies without
giving its leases back (SIGKILL, OOM) holds them at most ``lease_ttl_s``. The clock is Redis's own
(``TIME``), so hosts with skewed clocks share one notion of expiry.

When Redis fails, the decision follows RATE_LIMIT_FAIL_OPEN like the rate limit: open, the worker
falls back to its in-process caps (per worker: logged once per outage and counted as a rate-limit
storage error); closed, the stream is refused with a retryable 503 ``RATE_LIMIT_UNAVAILABLE``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
from collections.abc import Callable
from typing import Any

import redis.asyncio
from redis.exceptions import RedisError

from bridge.config import Settings
from bridge.errors import ServiceUnavailable, TooManyRequests
from bridge.streamcap import Caps, Lease, StreamCaps

log = logging.getLogger("bridge.caps")

STORE_ERRORS = (RedisError, OSError, TimeoutError)

# KEYS[1] the identity's set, KEYS[2] the server's; ARGV: per_user, total, member, ttl_ms.
# Returns 0 (taken), 1 (the identity is at its cap) or 2 (the server is at its cap).
_ACQUIRE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 1 end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[2]) then return 2 end
local expiry = now + tonumber(ARGV[4])
redis.call('ZADD', KEYS[1], expiry, ARGV[3])
redis.call('ZADD', KEYS[2], expiry, ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 0
"""

# KEYS: the server's set, then one identity set per lease; ARGV: ttl_ms, then the leases' members
# in the same order. Pushes the expiry of leases still present (XX: a released one stays gone).
_REFRESH_LUA = """
local t = redis.call('TIME')
local expiry = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i = 2, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', expiry, ARGV[i])
  redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i])
  redis.call('PEXPIRE', KEYS[i], ARGV[1])
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 0
"""

_REFRESH_CHUNK = 500


def user_key(identity_key: str) -> str:
    return "bzb:caps:user:" + hashlib.sha256(identity_key.encode("utf-8", "surrogatepass")).hexdigest()


def total_key(server_id: str) -> str:
    return f"bzb:caps:total:{server_id}"


class SharedLease(Lease):
    """A slot held in Redis; ``release()`` is idempotent and returns it off the caller's path."""

    __slots__ = ("_shared", "member")

    def __init__(self, caps: SharedStreamCaps, key: str, member: str) -> None:
        super().__init__(caps.local, key)
        self.member = member
        self._shared = caps

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._shared._release(self)


class SharedStreamCaps:
    """``take(key)``: a lease from the shared caps, or TooManyRequests / ServiceUnavailable."""

    def __init__(
        self,
        url: str,
        per_user: int,
        total: int,
        *,
        server_id: str,
        fail_open: bool,
        on_storage_error: Callable[[BaseException], None] | None = None,
        retry_after_s: float = 5.0,
        lease_ttl_s: float = 15.0,
        op_timeout_s: float = 1.0,
    ) -> None:
        self.per_user = per_user
        self.total = total
        self.retry_after_s = retry_after_s
        self.local = StreamCaps(per_user, total, retry_after_s=retry_after_s)
        self.fail_open = fail_open
        self.on_storage_error = on_storage_error
        self._total_key = total_key(server_id)
        self._ttl_ms = max(1000, int(lease_ttl_s * 1000))
        self._timeout = op_timeout_s
        self._prefix = secrets.token_hex(8)
        self._next = 0
        self._open: dict[str, SharedLease] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._refresher: asyncio.Task[None] | None = None
        self._down = False
        self._pool: redis.asyncio.ConnectionPool | None = None
        self._client: redis.asyncio.Redis | None = None
        self._url = url

    @property
    def open_total(self) -> int:
        """Streams this process holds (shared leases plus any taken locally during an outage)."""
        return len(self._open) + self.local.open_total

    def _redis(self) -> redis.asyncio.Redis:
        # Made on first use, inside the running loop: a pool made at import is bound to no loop.
        if self._client is None:
            self._pool = redis.asyncio.ConnectionPool.from_url(
                self._url, socket_timeout=self._timeout, socket_connect_timeout=self._timeout
            )
            self._client = redis.asyncio.Redis(connection_pool=self._pool)
            self._acquire = self._client.register_script(_ACQUIRE_LUA)
            self._refresh = self._client.register_script(_REFRESH_LUA)
            self._refresher = asyncio.get_running_loop().create_task(self._keep_alive())
        return self._client

    async def take(self, key: str) -> Lease:
        client = self._redis()
        self._next += 1
        member = f"{self._prefix}:{self._next}"
        try:
            async with asyncio.timeout(self._timeout):
                verdict = int(
                    await self._acquire(
                        keys=[user_key(key), self._total_key],
                        args=[self.per_user, self.total, member, self._ttl_ms],
                        client=client,
                    )
                )
        except STORE_ERRORS as exc:
            return self._without_store(key, exc)
        self._reachable()
        if verdict == 1:
            raise TooManyRequests(
                f"too many concurrent streams (limit {self.per_user})",
                code="TOO_MANY_STREAMS",
                retryable=True,
                retry_after_s=self.retry_after_s,
            )
        if verdict == 2:
            raise ServiceUnavailable(
                "the server is at its stream capacity, try again shortly",
                code="OVERLOADED",
                retryable=True,
                retry_after_s=self.retry_after_s,
            )
        lease = SharedLease(self, key, member)
        self._open[member] = lease
        return lease

    def _without_store(self, key: str, exc: BaseException) -> Lease:
        if self.on_storage_error is not None:
            self.on_storage_error(exc)
        if not self._down:
            self._down = True
            action = "counting streams per worker" if self.fail_open else "refusing streams"
            log.warning("stream-cap storage failed (%s); %s until it recovers", type(exc).__name__, action)
        if self.fail_open:
            return self.local.acquire(key)
        raise ServiceUnavailable(
            "stream limits are unavailable, try again shortly",
            code="RATE_LIMIT_UNAVAILABLE",
            retryable=True,
            retry_after_s=self.retry_after_s,
        )

    def _reachable(self) -> None:
        if self._down:
            self._down = False
            log.warning("stream-cap storage is reachable again")

    def _release(self, lease: SharedLease) -> None:
        self._open.pop(lease.member, None)
        if self._client is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (the process is ending): the lease expires within its TTL
            return
        task = loop.create_task(self._give_back(lease))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _give_back(self, lease: SharedLease) -> None:
        assert self._client is not None
        try:
            async with asyncio.timeout(self._timeout):
                pipe = self._client.pipeline(transaction=False)
                pipe.zrem(user_key(lease.key), lease.member)
                pipe.zrem(self._total_key, lease.member)
                await pipe.execute()
        except STORE_ERRORS:
            pass  # it expires within the lease TTL

    async def _keep_alive(self) -> None:
        """Push the expiry of every open lease on, every third of the TTL."""
        while True:
            await asyncio.sleep(self._ttl_ms / 3000)  # the refresh period, not synchronisation
            leases = list(self._open.values())
            for start in range(0, len(leases), _REFRESH_CHUNK):
                chunk = leases[start : start + _REFRESH_CHUNK]
                with contextlib.suppress(*STORE_ERRORS):
                    async with asyncio.timeout(self._timeout):
                        await self._refresh(
                            keys=[self._total_key, *(user_key(lease.key) for lease in chunk)],
                            args=[self._ttl_ms, *(lease.member for lease in chunk)],
                            client=self._client,
                        )

    async def aclose(self) -> None:
        """Give back what is still open, stop refreshing, release the connections."""
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
        for lease in list(self._open.values()):
            lease.release()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
        if self._pool is not None:
            await self._pool.disconnect()


def caps_for(
    settings: Settings, server_id: str, *, on_storage_error: Callable[[BaseException], None] | None = None
) -> Caps:
    """Shared caps when RATE_LIMIT_STORAGE is Redis, else in this process's memory."""
    if settings.rate_limit_storage.startswith(("redis://", "rediss://")):
        return SharedStreamCaps(
            settings.rate_limit_storage,
            settings.max_streams_per_user,
            settings.max_streams_total,
            server_id=server_id,
            fail_open=settings.rate_limit_fail_open,
            on_storage_error=on_storage_error,
        )
    return StreamCaps(settings.max_streams_per_user, settings.max_streams_total)
