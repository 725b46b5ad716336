"""``ResumeStore``: one instance's connection to the shared resume store (see bridge/resume).

Created and started in the app's lifespan, closed at shutdown; everything else receives it.
Owns the Redis pool, the bound on every call (``call``), the health bookkeeping (one warning per
outage) and the counters that /metrics exports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import redis.asyncio
from redis.exceptions import RedisError

from bridge.errors import OwnerUnreachable, ResumeStoreUnavailable
from bridge.resume.keys import (
    StoredStream,
    cancel_channel,
    ended_key,
    frames_key,
    meta_key,
    owner_tag,
    reader_key,
)
from bridge.stream.source import ENDED_HOLD_WINDOWS, StreamPolicy

log = logging.getLogger("bridge.resume")

STORE_ERRORS = (RedisError, OSError, TimeoutError)
_SUBSCRIBE_BACKOFF_MAX_S = 1.0  # how late the owner may hear stops after Redis returns
COUNTERS = (
    "frames_written",
    "write_failures",
    "read_failures",
    "sessions_given_up",
    "remote_resumes",
    "cancels_received",
    "cancels_sent",
)

# Re-arm an ended stream's frames and meta keys (KEYS[1], KEYS[2]) to ARGV[1] ms, never past the
# ceiling: the remaining PTTL of its ended key (KEYS[3]), which only the owner's closing flush sets.
# Atomic, so the ceiling holds exactly; GT, so one reader leaving never shortens another's window.
# Returns the ms applied, or <= 0 (no ended key: the owner still runs, or the ceiling has passed).
_HOLD_ENDED_LUA = """
local left = redis.call('PTTL', KEYS[3])
if left <= 0 then return left end
local ms = math.min(tonumber(ARGV[1]), left)
redis.call('PEXPIRE', KEYS[1], ms, 'GT')
redis.call('PEXPIRE', KEYS[2], ms, 'GT')
return ms
"""


@dataclass(frozen=True, slots=True)
class Timings:
    """Every duration the store uses, derived from the resume policy (seconds)."""

    grace_s: float
    ttl_s: float
    end_ttl_s: float
    end_hold_max_s: float
    refresh_s: float
    reader_ttl_s: float
    block_s: float
    op_timeout_s: float

    @classmethod
    def from_policy(cls, policy: StreamPolicy, ttl_margin_s: float, op_timeout_s: float) -> Timings:
        grace = policy.resume_grace_s
        ttl = grace + ttl_margin_s
        return cls(
            grace_s=grace,
            ttl_s=ttl,
            end_ttl_s=grace + 1.0,
            # How long after its end an ended stream's keys may be held by readers coming and
            # going (``hold_ended``): the same ceiling as the owner's registry.
            end_hold_max_s=grace * ENDED_HOLD_WINDOWS + 1.0,
            refresh_s=max(0.5, ttl / 3),
            reader_ttl_s=max(1.0, min(grace, 10.0)),
            # Also how often a reader checks that the owner is still alive (meta present).
            block_s=max(0.1, min(policy.heartbeat_interval_s, 5.0)),
            op_timeout_s=op_timeout_s,
        )


class ResumeStore:
    """One instance's connection to the shared resume store; see the module docstring."""

    def __init__(
        self,
        url: str,
        policy: StreamPolicy,
        *,
        on_cancel: Callable[[str], object],
        ttl_margin_s: float = 5.0,
        op_timeout_s: float = 1.0,
    ) -> None:
        self.instance = secrets.token_hex(8)
        self.policy = policy
        self.timings = Timings.from_policy(policy, ttl_margin_s, op_timeout_s)
        self.on_cancel = on_cancel
        # No socket_timeout: XREAD BLOCK and pub/sub wait longer than one command should; every
        # call is bounded by asyncio.timeout instead.
        self._pool: redis.asyncio.ConnectionPool = redis.asyncio.ConnectionPool.from_url(
            url, socket_connect_timeout=op_timeout_s, health_check_interval=30
        )
        self.client: redis.asyncio.Redis = redis.asyncio.Redis(connection_pool=self._pool)
        self._hold_ended = self.client.register_script(_HOLD_ENDED_LUA)
        self._counters = dict.fromkeys(COUNTERS, 0)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._subscriber: asyncio.Task[None] | None = None
        self._down = False
        self._reachable = asyncio.Event()  # set by every successful call; wakes the subscriber
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the cancel subscriber (idempotent; needs a running loop: called in the lifespan,
        since a redis.asyncio pool or task made elsewhere would be bound to another loop)."""
        if self._subscriber is None and not self._closed:
            self._subscriber = asyncio.get_running_loop().create_task(self._subscribe())

    async def aclose(self) -> None:
        """Stop the subscriber, give pending writes a moment, release every connection."""
        self._closed = True
        if self._subscriber is not None:
            self._subscriber.cancel()
            await asyncio.gather(self._subscriber, return_exceptions=True)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self.timings.op_timeout_s)
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.client.aclose()
        await self._pool.disconnect()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """A background task kept referenced until done (else the loop may drop it mid-flight)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def count(self, counter: str, n: int = 1) -> None:
        """Add to one of ``COUNTERS`` (exported as ``bridge_resume_store_<counter>_total``)."""
        self._counters[counter] += n

    def stats(self) -> dict[str, int | bool]:
        return {**self._counters, "store_down": self._down}

    # -- health bookkeeping ----------------------------------------------------------------------

    def failed(self, what: str, exc: BaseException) -> None:
        """Count a failed call (``write_failures`` or ``read_failures``) and warn once per outage."""
        counter = "write_failures" if what == "write" else "read_failures"
        self._counters[counter] += 1
        if not self._down:  # warn once per outage, not once per batch
            self._down = True
            log.warning(
                "resume store failed on %s (%s: %s); resume across instances degraded", what, type(exc).__name__, exc
            )

    def succeeded(self) -> None:
        self._reachable.set()
        if self._down:
            self._down = False
            log.warning("resume store is reachable again")

    async def call(self, awaitable: Any, extra_s: float = 0.0) -> Any:
        """Await one Redis call, bounded (redis-py types its asyncio commands as ``Awaitable | T``)."""
        async with asyncio.timeout(self.timings.op_timeout_s + extra_s):
            return await awaitable

    # -- cancels addressed to this instance ----------------------------------------------------

    async def _subscribe(self) -> None:
        """Receive cancels addressed to this instance; reconnect with backoff forever.

        The backoff stays short (at most ``_SUBSCRIBE_BACKOFF_MAX_S``) and any other successful
        Redis call ends it at once (``succeeded`` sets ``_reachable``): with a long backoff the
        subscriber sleeps through Redis's return, and the stops published meanwhile reach nobody.
        """
        backoff = 0.2
        while True:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                await self.call(pubsub.subscribe(cancel_channel(self.instance)))
                backoff = 0.2
                self.succeeded()
                while True:
                    message = await pubsub.get_message(timeout=30.0)
                    if message is not None and message.get("type") == "message":
                        self.count("cancels_received")
                        data = message["data"]
                        self.on_cancel(data.decode() if isinstance(data, bytes) else str(data))
            except asyncio.CancelledError:
                raise
            except STORE_ERRORS as exc:
                self.failed("subscribe", exc)
                self._reachable.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(backoff):  # retry backoff, cut short by a success
                        await self._reachable.wait()
                backoff = min(backoff * 2, _SUBSCRIBE_BACKOFF_MAX_S)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.shield(pubsub.aclose())  # type: ignore[no-untyped-call]

    # -- owner side ------------------------------------------------------------------------------

    @property
    def down(self) -> bool:
        """The last call failed and none has succeeded since (an outage is under way)."""
        return self._down

    async def claim(self, stream_id: str, owner: str, request_id: str, opening_s: float) -> bool:
        """Store a new stream's meta record; True once Redis holds it.

        Awaited before the stream's id leaves this instance (bridge.stream.opener): if it were
        written only by the first flush of the stream's mirror, off the token path, a client that
        had read the first frame and resumed on another instance at once could find no record, and
        that instance would answer the final, non-retryable STREAM_EXPIRED for a live stream. The TTL covers
        the open (``opening_s``, the longest the response head may wait) plus the running TTL; the
        mirror refreshes it from then on. A failure is counted and answered False: the stream then
        runs under single-instance rules until the mirror reaches Redis.
        """
        key = meta_key(stream_id)
        record = {"owner": owner, "instance": self.instance, "request_id": request_id}
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.hset(key, mapping=record)
            pipe.pexpire(key, int((self.timings.ttl_s + opening_s) * 1000))
            await self.call(pipe.execute())
        except STORE_ERRORS as exc:
            self.failed("write", exc)
            return False
        self.succeeded()
        return True

    async def unclaim(self, stream_id: str) -> None:
        """Forget the meta record of a stream whose open was refused or interrupted (best effort:
        its id never reached a client, and the record expires by itself anyway)."""
        with contextlib.suppress(*STORE_ERRORS):
            await self.call(self.client.delete(meta_key(stream_id)))

    # -- reader side -----------------------------------------------------------------------------

    async def lookup(self, stream_id: str) -> StoredStream | None:
        try:
            raw = await self.call(self.client.hgetall(meta_key(stream_id)))
        except STORE_ERRORS as exc:
            self.failed("read", exc)
            raise ResumeStoreUnavailable(
                "the resume store is unavailable; retry", retryable=True, retry_after_s=1
            ) from None
        meta = StoredStream.parse(stream_id, raw)
        if StoredStream.unreadable(raw, meta):
            log.warning("stream %s: its resume record cannot be read; answered as expired", stream_id)
        return meta

    async def hold_reader(self, stream_id: str, seconds: float, *, strict: bool = False) -> None:
        """(Re)set the reader key: a reader elsewhere holds the stream for ``seconds`` more."""
        try:
            await self.call(self.client.set(reader_key(stream_id), self.instance, px=max(1, int(seconds * 1000))))
        except STORE_ERRORS as exc:
            if strict:
                raise
            self.failed("read", exc)

    async def hold_ended(self, stream_id: str) -> int | None:
        """A reader of an ended stream left (or still reads): keep its frames and meta for a
        resume window (``end_ttl_s``) from now, never longer than ``end_hold_max_s`` after its end.

        The owner sets those keys' TTL once, at the end; counted only from there, a reader on
        another instance that lagged behind a finished answer and then dropped would find them gone
        within its own window (STREAM_EXPIRED for a completed answer). Returns the milliseconds applied,
        0 when nothing was held (the stream has not ended, or its ceiling passed), None when Redis
        failed (counted).
        """
        keys = [frames_key(stream_id), meta_key(stream_id), ended_key(stream_id)]
        try:
            applied = await self.call(
                self._hold_ended(keys=keys, args=[int(self.timings.end_ttl_s * 1000)], client=self.client)
            )
        except STORE_ERRORS as exc:
            self.failed("write", exc)
            return None
        return max(0, int(applied))

    async def drop_reader(self, stream_id: str) -> None:
        with contextlib.suppress(*STORE_ERRORS):
            await self.call(self.client.delete(reader_key(stream_id)))

    async def request_cancel(self, stream_id: str, identity_key: str) -> bool:
        """Explicit stop of a stream owned by another instance; False when it is not the caller's.

        Raises ``ResumeStoreUnavailable`` or ``OwnerUnreachable`` (retryable 503s) when the stop
        could not be delivered.
        """
        meta = await self.lookup(stream_id)
        if meta is None or meta.owner != owner_tag(identity_key):
            return False
        if meta.over:
            # Over already (completed, ended by its owner's shutdown, stopped, expired): there is
            # nothing left to stop. Published, such a stop finds no receiver once the owner has
            # exited, and the caller would get a retryable 503 for a stream that has stopped.
            return True
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.delete(reader_key(stream_id))
            pipe.publish(cancel_channel(meta.instance), stream_id)
            _, receivers = await self.call(pipe.execute())
        except STORE_ERRORS as exc:
            self.failed("cancel", exc)
            raise ResumeStoreUnavailable(
                "the resume store is unavailable; retry", retryable=True, retry_after_s=1
            ) from None
        if not receivers:
            # Nobody listens on the owner's channel (its subscriber is reconnecting, or the owner
            # died): the stop reached no one, and a 204 here promised a stop that never happened.
            raise OwnerUnreachable(
                "the instance that owns this stream did not receive the stop; retry", retryable=True, retry_after_s=1
            )
        self.count("cancels_sent")
        return True
