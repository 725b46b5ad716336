"""Shared resume across bridge instances through Redis (``RESUME_STORE=redis://host:port/db``).

Without it a stream can be resumed only on the instance that owns its gRPC call, so behind a load
balancer without sticky sessions most reconnects would get ``STREAM_EXPIRED``. With it:

* the owner (instance A) mirrors every frame it produces into a Redis stream, off the hot path
  (``FrameMirror``: ``offer`` only queues; one task per session flushes batches in a pipeline);
* any other instance (B) serves a ``Last-Event-ID`` reconnect from Redis (``RemoteStream``), the
  very bytes A produced, until the final frame;
* B's reader keeps a short-TTL reader key alive, which A's grace timer consults before cancelling
  upstream (``FrameMirror.reader_hold_s``), and an explicit stop on B reaches A over pub/sub.

Key layout (all expire on their own, so a crashed instance leaves nothing behind for long):

``bzb:frames:{stream_id}``
    Redis stream; entry id ``{seq}-0`` (seq = the SSE event id's number) with field ``d`` = frame
    bytes and ``f`` = ``1`` on the final ``done``/``error`` frame. Explicit ids make order and
    dedupe exact: a retried batch's XADD of an id already there fails and is ignored. A stream that
    ended without a final frame (cancelled, expired) gets one end marker ``{last_seq}-1`` with field
    ``end`` = outcome. ``MAXLEN ~ RESUME_BUFFER_FRAMES``.
``bzb:meta:{stream_id}``
    hash: ``owner`` (SHA-256 of the caller's identity key: no user id or IP stored in clear),
    ``instance`` (the owner's id, which names its cancel channel), ``request_id``, ``last_seq``,
    ``final_seq`` once the final frame is stored, ``end`` once the session is over.
``bzb:reader:{stream_id}``
    present while a reader on another instance holds the stream (TTL ``reader_ttl_s``, refreshed
    every third of it); set to the grace window when that reader's client leaves.
``bzb:cancel:{instance}``
    pub/sub channel; the message is a stream id to cancel. One subscriber task per instance.

TTLs: frames and meta live ``RESUME_GRACE_S + ttl_margin_s`` while the owner runs (refreshed with
every batch and at least every third of that when no frame comes), and ``RESUME_GRACE_S + 1`` once
the stream is over, so keys outlive the window in which a reconnect is allowed and no longer.

Failure behaviour: every Redis call is bounded by a timeout and no Redis call is awaited by the
pump that delivers tokens. If Redis is slow or down, the owner keeps serving its local client; a
session's unflushed frames are retried with backoff and, once they exceed the resume buffer or the
store has failed for a whole TTL, that session gives up mirroring (counted, logged once per outage)
and falls back to single-instance rules. A reader on B that cannot reach Redis ends with a
retryable ``RESUME_UNAVAILABLE`` error frame carrying the last id it sent, so the client can retry
(possibly reaching A); a reader that finds the meta record gone ends with ``STREAM_EXPIRED``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import redis.asyncio
from redis.exceptions import RedisError, ResponseError

from bridge import sse
from bridge.errors import BridgeError
from bridge.streaming import Notifier, StreamExpired, StreamPolicy, Wakeable, coalesce
from bridge.types import Outcome

log = logging.getLogger("bridge.resume_store")

_BATCH = 256  # frames per pipeline round trip
_STORE_ERRORS = (RedisError, OSError, TimeoutError)


def frames_key(stream_id: str) -> str:
    return f"bzb:frames:{stream_id}"


def meta_key(stream_id: str) -> str:
    return f"bzb:meta:{stream_id}"


def reader_key(stream_id: str) -> str:
    return f"bzb:reader:{stream_id}"


def cancel_channel(instance: str) -> str:
    return f"bzb:cancel:{instance}"


def owner_tag(identity_key: str) -> str:
    return hashlib.sha256(identity_key.encode("utf-8")).hexdigest()


class StoreUnavailable(BridgeError):
    """Redis could not be asked; retryable, since the owner instance may still serve the stream."""

    status = 503
    default_code = "RESUME_UNAVAILABLE"


class StreamNotFound(Exception):
    """The stream exists but belongs to another caller (answered as 404 STREAM_NOT_FOUND)."""


@dataclass(frozen=True, slots=True)
class Timings:
    """Every duration the store uses, derived from the resume policy (seconds)."""

    grace_s: float
    ttl_s: float
    end_ttl_s: float
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
            refresh_s=max(0.5, ttl / 3),
            reader_ttl_s=max(1.0, min(grace, 10.0)),
            # Also how often a reader checks that the owner is still alive (meta present).
            block_s=max(0.1, min(policy.heartbeat_interval_s, 5.0)),
            op_timeout_s=op_timeout_s,
        )


@dataclass(frozen=True, slots=True)
class StoredStream:
    """The meta record of a stream as read from Redis."""

    stream_id: str
    owner: str
    instance: str
    request_id: str
    last_seq: int
    final_seq: int | None
    end: str | None

    @classmethod
    def parse(cls, stream_id: str, raw: dict[bytes, bytes]) -> StoredStream | None:
        if not raw or b"owner" not in raw:
            return None
        text = {k.decode(): v.decode() for k, v in raw.items()}
        final = text.get("final_seq")
        return cls(
            stream_id=stream_id,
            owner=text["owner"],
            instance=text.get("instance", ""),
            request_id=text.get("request_id", ""),
            last_seq=int(text.get("last_seq", "0")),
            final_seq=int(final) if final else None,
            end=text.get("end") or None,
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
        self.counters: dict[str, int] = {
            "frames_written": 0, "write_failures": 0, "read_failures": 0, "sessions_given_up": 0,
            "remote_resumes": 0, "cancels_received": 0, "cancels_sent": 0,
        }
        self._tasks: set[asyncio.Task[Any]] = set()
        self._subscriber: asyncio.Task[None] | None = None
        self._down = False
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the cancel subscriber (idempotent; needs a running loop)."""
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

    def stats(self) -> dict[str, Any]:
        return {**self.counters, "store_down": self._down}

    # -- health bookkeeping ----------------------------------------------------------------------

    def failed(self, what: str, exc: BaseException) -> None:
        """Count a failed call (``write_failures`` or ``read_failures``) and warn once per outage."""
        counter = "write_failures" if what == "write" else "read_failures"
        self.counters[counter] += 1
        if not self._down:  # warn once per outage, not once per batch
            self._down = True
            log.warning("resume store failed on %s (%s: %s); resume across instances degraded",
                        what, type(exc).__name__, exc)

    def succeeded(self) -> None:
        if self._down:
            self._down = False
            log.warning("resume store is reachable again")

    async def _call(self, awaitable: Any, extra_s: float = 0.0) -> Any:
        """Await one Redis call, bounded (redis-py types its asyncio commands as ``Awaitable | T``)."""
        async with asyncio.timeout(self.timings.op_timeout_s + extra_s):
            return await awaitable

    # -- owner side ------------------------------------------------------------------------------

    def mirror(self, stream_id: str, request_id: str, identity_key: str) -> FrameMirror:
        """The sink a new local session offers its frames to."""
        self.start()
        return FrameMirror(self, stream_id, request_id, owner_tag(identity_key))

    async def _subscribe(self) -> None:
        """Receive cancels addressed to this instance; reconnect with backoff forever."""
        backoff = 0.2
        while True:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                await self._call(pubsub.subscribe(cancel_channel(self.instance)))
                backoff = 0.2
                while True:
                    message = await pubsub.get_message(timeout=30.0)
                    if message is not None and message.get("type") == "message":
                        self.counters["cancels_received"] += 1
                        data = message["data"]
                        self.on_cancel(data.decode() if isinstance(data, bytes) else str(data))
            except asyncio.CancelledError:
                raise
            except _STORE_ERRORS as exc:
                self.failed("subscribe", exc)
                await asyncio.sleep(backoff)  # retry backoff, not synchronisation
                backoff = min(backoff * 2, 5.0)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.shield(pubsub.aclose())  # type: ignore[no-untyped-call]

    # -- reader side -----------------------------------------------------------------------------

    async def lookup(self, stream_id: str) -> StoredStream | None:
        try:
            raw = await self._call(self.client.hgetall(meta_key(stream_id)))
        except _STORE_ERRORS as exc:
            self.failed("read", exc)
            raise StoreUnavailable("the resume store is unavailable; retry", retryable=True,
                                   retry_after_s=1) from None
        return StoredStream.parse(stream_id, raw)

    async def open_remote(self, stream_id: str, identity_key: str, after_seq: int) -> RemoteStream | None:
        """Check a reconnect against the store; a reader ready to attach, or None (nothing left).

        Raises StreamExpired (unknown, expired, cancelled, trimmed, never sent), StreamNotFound
        (another caller's stream) or StoreUnavailable. On success the reader key is already set,
        so the owner's grace timer cannot fire between this check and the first XREAD.
        """
        meta = await self.lookup(stream_id)
        if meta is None:
            raise StreamExpired("the stream is no longer available; ask again", retryable=False)
        if meta.owner != owner_tag(identity_key):
            raise StreamNotFound(stream_id)
        if meta.final_seq is not None:
            if after_seq == meta.final_seq:
                return None
            if after_seq > meta.final_seq:
                raise StreamExpired("this event id was never sent", retryable=False)
        elif meta.end is not None:
            raise StreamExpired("the stream expired before it was resumed", retryable=False)
        try:
            first = await self._call(self.client.xrange(frames_key(stream_id), count=1))
            if first and _seq_of(first[0][0])[0] > after_seq + 1:
                raise StreamExpired("the frames after this event id are no longer held", retryable=False)
            await self.hold_reader(stream_id, self.timings.reader_ttl_s, strict=True)
        except _STORE_ERRORS as exc:
            self.failed("read", exc)
            raise StoreUnavailable("the resume store is unavailable; retry", retryable=True,
                                   retry_after_s=1) from None
        self.counters["remote_resumes"] += 1
        return RemoteStream(self, meta, after_seq)

    async def hold_reader(self, stream_id: str, seconds: float, *, strict: bool = False) -> None:
        """(Re)set the reader key: a reader elsewhere holds the stream for ``seconds`` more."""
        try:
            await self._call(self.client.set(reader_key(stream_id), self.instance,
                                             px=max(1, int(seconds * 1000))))
        except _STORE_ERRORS as exc:
            if strict:
                raise
            self.failed("read", exc)

    async def drop_reader(self, stream_id: str) -> None:
        with contextlib.suppress(*_STORE_ERRORS):
            await self._call(self.client.delete(reader_key(stream_id)))

    async def request_cancel(self, stream_id: str, identity_key: str) -> bool:
        """Explicit stop of a stream owned by another instance; False when it is not the caller's."""
        meta = await self.lookup(stream_id)
        if meta is None or meta.owner != owner_tag(identity_key):
            return False
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.delete(reader_key(stream_id))
            pipe.publish(cancel_channel(meta.instance), stream_id)
            await self._call(pipe.execute())
        except _STORE_ERRORS as exc:
            self.failed("cancel", exc)
            raise StoreUnavailable("the resume store is unavailable; retry", retryable=True,
                                   retry_after_s=1) from None
        self.counters["cancels_sent"] += 1
        return True


def _seq_of(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, part = text.partition("-")
    return int(ms), int(part or "0")


class FrameMirror:
    """The owner's per-session writer: frames queued on the hot path, flushed by one task.

    Invariants: ``offer`` never awaits (a slow Redis cannot delay a token to a local client);
    the queue is bounded by the resume buffer, and overflowing it gives up mirroring for this
    session instead of growing memory; frames reach Redis in seq order, each at most once.
    """

    def __init__(self, store: ResumeStore, stream_id: str, request_id: str, owner: str) -> None:
        self.store = store
        self.stream_id = stream_id
        self._meta = {"owner": owner, "instance": store.instance, "request_id": request_id}
        self._pending: deque[tuple[int, bytes, bool]] = deque()
        self._pending_bytes = 0
        self._wake = asyncio.Event()
        self._healthy = True
        self._flushed = 0
        self._offered = 0
        self._final_seq: int | None = None
        self._ended: Outcome | None = None
        self._meta_written = False
        self._failing_since: float | None = None
        self.task = store.spawn(self._run())

    @property
    def healthy(self) -> bool:
        return self._healthy

    @property
    def flushed_seq(self) -> int:
        return self._flushed

    def offer(self, seq: int, data: bytes, final: bool) -> None:
        if not self._healthy:
            return
        self._pending.append((seq, data, final))
        self._pending_bytes += len(data)
        self._offered = seq
        if final:
            self._final_seq = seq
        policy = self.store.policy
        if len(self._pending) > policy.buffer_frames or self._pending_bytes > policy.buffer_bytes:
            self._give_up("the resume store is not keeping up")
            return
        self._wake.set()

    def end(self, outcome: Outcome) -> None:
        self._ended = outcome
        self._wake.set()

    async def reader_hold_s(self) -> float:
        if not self._healthy:
            return 0.0
        try:
            ms = await self.store._call(self.store.client.pttl(reader_key(self.stream_id)))
        except _STORE_ERRORS as exc:
            self.store.failed("read", exc)
            return 0.0
        return max(0, int(ms)) / 1000

    def _give_up(self, reason: str) -> None:
        if not self._healthy:
            return
        self._healthy = False
        self._pending.clear()
        self._pending_bytes = 0
        self.store.counters["sessions_given_up"] += 1
        log.warning("stream %s: stopped mirroring to the resume store (%s)", self.stream_id, reason)
        self._wake.set()

    async def _run(self) -> None:
        timings = self.store.timings
        backoff = 0.05
        while True:
            if self._healthy and not self._pending and self._ended is None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timings.refresh_s):
                        await self._wake.wait()
                self._wake.clear()
            if not self._healthy:
                await self._mark_lost()
                return
            batch = [self._pending[i] for i in range(min(_BATCH, len(self._pending)))]
            closing = self._ended is not None and len(batch) == len(self._pending)
            try:
                await self._flush(batch, closing)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # not only Redis errors: a bug must not kill the writer silently
                if not isinstance(exc, _STORE_ERRORS):
                    log.exception("stream %s: resume store write failed", self.stream_id)
                self.store.failed("write", exc)
                now = time.monotonic()
                self._failing_since = self._failing_since or now
                if now - self._failing_since > timings.ttl_s:
                    # Whatever was stored has expired by now: readers already see STREAM_EXPIRED.
                    self._give_up("the resume store has been failing for a whole TTL")
                    return
                await asyncio.sleep(backoff)  # retry backoff, not synchronisation
                backoff = min(backoff * 2, 2.0)
                continue
            self.store.succeeded()
            self._failing_since = None
            backoff = 0.05
            if not self._healthy:  # gave up (queue overflow) while this batch was in flight
                continue
            for _ in batch:
                _, data, _ = self._pending.popleft()
                self._pending_bytes -= len(data)
            if batch:
                self._flushed = batch[-1][0]
                self.store.counters["frames_written"] += len(batch)
            if closing:
                return

    async def _flush(self, batch: list[tuple[int, bytes, bool]], closing: bool) -> None:
        store = self.store
        fkey, mkey = frames_key(self.stream_id), meta_key(self.stream_id)
        pipe = store.client.pipeline(transaction=False)
        meta: dict[Any, Any] = {}  # redis-py's hset mapping type differs between releases
        if not self._meta_written:
            meta.update(self._meta)
        for seq, data, final in batch:
            fields: dict[str, bytes] = {"d": data, "f": b"1"} if final else {"d": data}
            pipe.xadd(fkey, fields,  # type: ignore[arg-type]
                      id=f"{seq}-0", maxlen=store.policy.buffer_frames, approximate=True)
            meta["last_seq"] = seq
            if final:
                meta["final_seq"] = seq
        ttl = store.timings.ttl_s
        if closing:
            assert self._ended is not None
            if self._final_seq is None:  # no final frame: tell readers the stream is over
                pipe.xadd(fkey, {"end": self._ended}, id=f"{self._offered}-1")
            meta["end"] = self._ended
            ttl = store.timings.end_ttl_s
        if meta:
            pipe.hset(mkey, mapping=meta)
        pipe.pexpire(fkey, int(ttl * 1000))
        pipe.pexpire(mkey, int(ttl * 1000))
        results = await store._call(pipe.execute(raise_on_error=False))
        for result in results:
            if isinstance(result, ResponseError) and "equal or smaller" in str(result):
                continue  # already stored by an earlier attempt of this batch: exact dedupe
            if isinstance(result, Exception):
                raise result
        self._meta_written = True

    async def _mark_lost(self) -> None:
        """Best effort: readers elsewhere stop, and later resumes there get STREAM_EXPIRED."""
        store = self.store
        with contextlib.suppress(*_STORE_ERRORS):
            pipe = store.client.pipeline(transaction=False)
            pipe.hset(meta_key(self.stream_id), "end", "lost")
            pipe.xadd(frames_key(self.stream_id), {"end": "lost"}, id=f"{self._flushed}-1")
            await store._call(pipe.execute(raise_on_error=False))


class RemoteStream(Wakeable):
    """A reader on a non-owner instance: the store's frames as a ``FrameSource``.

    Invariants: frames are delivered in seq order with no gap (a hole, i.e. frames trimmed before
    this reader got them, ends the stream with STREAM_EXPIRED rather than skipping); at most
    ``window_frames`` are buffered here (XREAD pauses while the client is behind); the reader key
    is refreshed only while an HTTP client is attached, so a reader that leaves releases the
    owner after the grace window.
    """

    def __init__(self, store: ResumeStore, meta: StoredStream, after_seq: int) -> None:
        self.store = store
        self.stream_id = meta.stream_id
        self.request_id = meta.request_id
        self.policy = store.policy
        self.generation = 0
        self.finished = False
        self.sent_seq = after_seq
        self._next = after_seq + 1
        self._frames: deque[tuple[int, bytes]] = deque()
        self._bytes = 0
        self._changed = Notifier()
        self._space = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def attach(self, after_seq: int) -> int:
        self.generation += 1
        self.sent_seq = after_seq
        self._next = after_seq + 1
        self._tasks = [self.store.spawn(self._read(f"{after_seq}-0")), self.store.spawn(self._keepalive())]
        return self.generation

    def _stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks = []

    def detach(self, generation: int) -> None:
        """The client left: give it the grace window to come back (here or anywhere). Idempotent."""
        if generation != self.generation or not self._tasks:
            return
        self._stop()
        self.store.spawn(self.store.hold_reader(self.stream_id, self.store.timings.grace_s))

    def release(self, generation: int) -> None:
        """The final frame was written: nobody needs the owner to wait any more."""
        if generation != self.generation:
            return
        self._stop()
        self.store.spawn(self.store.drop_reader(self.stream_id))

    def take(self) -> tuple[bytes, int]:
        return coalesce(self._frames, self._bytes, self.sent_seq)

    def acknowledge(self, seq: int, generation: int) -> None:
        if generation != self.generation:
            return
        while self._frames and self._frames[0][0] <= seq:
            self._bytes -= len(self._frames.popleft()[1])
        self.sent_seq = seq
        self._space.set()

    def _push(self, seq: int, data: bytes, final: bool = False) -> None:
        self._frames.append((seq, data))
        self._bytes += len(data)
        if final:
            self.finished = True
        self._changed.notify()

    def _fail(self, error: BridgeError) -> None:
        """End with ``error`` as the final frame, id = the last frame delivered (safe to resume)."""
        last = self._next - 1
        prefix = sse.retry_field(int(error.retry_after_s * 1000)) if error.retry_after_s else b""
        self._push(last, prefix + sse.json_frame(f"{self.stream_id}:{last}", error.frame()), final=True)

    async def _keepalive(self) -> None:
        every = self.store.timings.reader_ttl_s / 3
        while True:
            await self.store.hold_reader(self.stream_id, self.store.timings.reader_ttl_s)
            await asyncio.sleep(every)  # the refresh period, not synchronisation

    async def _read(self, last_id: str) -> None:
        store = self.store
        fkey = frames_key(self.stream_id)
        block_ms = int(store.timings.block_s * 1000)
        try:
            while not self.finished:
                while len(self._frames) >= self.policy.window_frames:
                    self._space.clear()
                    await self._space.wait()
                reply = await store._call(
                    store.client.xread({fkey: last_id}, count=_BATCH, block=block_ms), store.timings.block_s
                )
                entries = _entries(reply)
                if not entries:
                    if not await store._call(store.client.exists(meta_key(self.stream_id))):
                        self._fail(StreamExpired("the stream is no longer available; ask again",
                                                 retryable=False))
                    continue
                for entry_id, fields in entries:
                    last_id = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
                    seq, part = _seq_of(last_id)
                    data = fields.get(b"d")
                    if part != 0 or data is None:  # end marker: upstream ended without a final frame
                        self.finished = True
                        self._changed.notify()
                        break
                    if seq < self._next:
                        continue
                    if seq > self._next:
                        self._fail(StreamExpired("the frames after this event id are no longer held",
                                                 retryable=False))
                        break
                    self._next += 1
                    self._push(seq, data, final=b"f" in fields)
                    if self.finished:
                        break
            store.succeeded()
        except _STORE_ERRORS as exc:
            store.failed("read", exc)
            self._fail(StoreUnavailable("the resume store is unavailable; reconnect to continue",
                                        retryable=True, retry_after_s=1))
        except Exception:  # a bug must still end the stream with a frame, not heartbeat forever
            log.exception("stream %s: remote reader failed", self.stream_id)
            self._fail(BridgeError("internal error in the bridge", code="INTERNAL", retryable=True))


def _entries(reply: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """XREAD's answer for our one key (RESP2, the protocol this pool speaks: ``[[key, entries]]``)."""
    if not reply:
        return []
    return list(reply[0][1])
