"""``FrameMirror``: the owner's per-session writer of frames into the shared resume store."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import Any

from redis.exceptions import ResponseError

from bridge.resume.client import STORE_ERRORS, ResumeStore
from bridge.resume.keys import BATCH, LOST, ended_key, frames_key, meta_key, reader_key
from bridge.types import Outcome

log = logging.getLogger("bridge.resume")

# A reader leaving less than this long after the closing flush was sent needs no re-arm: that
# flush's TTL (grace + 1 s, counted from when Redis ran it) already lasts a window past the leave,
# with half a second to spare. Most completed streams' readers leave right then (the final frame
# goes out as it is flushed), so re-arming would cost nearly every stream one more Redis round trip.
_CLOSING_TTL_COVERS_S = 0.5


class FrameMirror:
    """The owner's per-session writer: frames queued on the hot path, flushed by one task.

    Invariants: ``offer`` never awaits (a slow Redis cannot delay a token to a local client);
    the queue is bounded by the resume buffer, and overflowing it gives up mirroring for this
    session instead of growing memory; frames reach Redis in seq order, each at most once; once
    the stream ended, this instance's reader holds its keys while attached and a window past its
    leaving (``ResumeStore.hold_ended``, capped), like the registry holds the session.
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
        self._closed = False  # the closing flush is stored (the ended key exists from then on)
        self._closing_sent = 0.0  # time.monotonic() when that flush was last sent
        self._reading_here = True  # the first reader attaches right after the call opens
        self._holder: asyncio.Task[None] | None = None
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

    def reader_attached(self) -> None:
        self._reading_here = True
        self._hold_while_read()

    def reader_left(self) -> None:
        """This instance's reader left: once the stream ended, hold its keys a window from now.

        Spawned, never awaited by the caller. Skipped before the closing flush is stored (it
        would hold nothing: no ended key yet; that flush's TTL counts from a later moment) and
        right after it (``_CLOSING_TTL_COVERS_S``).
        """
        self._reading_here = False
        self._wake.set()  # ends the holder's wait
        if self._healthy and self._closed and time.monotonic() - self._closing_sent > _CLOSING_TTL_COVERS_S:
            self.store.spawn(self.store.hold_ended(self.stream_id))

    def _hold_while_read(self) -> None:
        if self._closed and self._healthy and self._reading_here and self._holder is None:
            self._holder = self.store.spawn(self._hold())

    async def _hold(self) -> None:
        """Hold the ended stream's keys while this instance's reader is still attached.

        An attached reader counts as leaving now (as in the registry): a local client lagging
        behind the finished answer for longer than the end's TTL, then dropping and reconnecting
        to another instance, found the keys expired under it (STREAM_EXPIRED). Ends when the
        reader leaves or the ceiling passed (``hold_ended`` held nothing).
        """
        every = self.store.timings.end_ttl_s / 3
        try:
            while True:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(every):  # the refresh period, cut short by a leave
                        await self._wake.wait()
                if not self._reading_here or await self.store.hold_ended(self.stream_id) == 0:
                    return
        finally:
            self._holder = None

    async def reader_hold_s(self) -> float:
        if not self._healthy:
            return 0.0
        try:
            ms = await self.store.call(self.store.client.pttl(reader_key(self.stream_id)))
        except STORE_ERRORS as exc:
            self.store.failed("read", exc)
            return 0.0
        return max(0, int(ms)) / 1000

    def _give_up(self, reason: str) -> None:
        if not self._healthy:
            return
        self._healthy = False
        self._pending.clear()
        self._pending_bytes = 0
        self.store.count("sessions_given_up")
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
            batch = [self._pending[i] for i in range(min(BATCH, len(self._pending)))]
            closing = self._ended is not None and len(batch) == len(self._pending)
            if closing:
                self._closing_sent = time.monotonic()
            try:
                await self._flush(batch, closing)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # not only Redis errors: a bug must not kill the writer silently
                if not isinstance(exc, STORE_ERRORS):
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
                self.store.count("frames_written", len(batch))
            if closing:
                self._closed = True
                self._hold_while_read()
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
            pipe.xadd(
                fkey,
                fields,  # type: ignore[arg-type]
                id=f"{seq}-0",
                maxlen=store.policy.buffer_frames,
                approximate=True,
            )
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
            if self._final_seq is not None:  # resumable to its end: readers may hold it (hold_ended)
                ceiling_ms = int(store.timings.end_hold_max_s * 1000)
                pipe.set(ended_key(self.stream_id), b"1", px=ceiling_ms, nx=True)  # NX: a retry keeps it
        if meta:
            pipe.hset(mkey, mapping=meta)
        pipe.pexpire(fkey, int(ttl * 1000))
        pipe.pexpire(mkey, int(ttl * 1000))
        results = await store.call(pipe.execute(raise_on_error=False))
        for result in results:
            if isinstance(result, ResponseError) and "equal or smaller" in str(result):
                continue  # already stored by an earlier attempt of this batch: exact dedupe
            if isinstance(result, Exception):
                raise result
        self._meta_written = True

    async def _mark_lost(self) -> None:
        """Best effort: readers elsewhere stop, and later resumes there get STREAM_EXPIRED."""
        store = self.store
        with contextlib.suppress(*STORE_ERRORS):
            pipe = store.client.pipeline(transaction=False)
            pipe.hset(meta_key(self.stream_id), "end", LOST)
            pipe.xadd(frames_key(self.stream_id), {"end": LOST}, id=f"{self._flushed}-1")
            await store.call(pipe.execute(raise_on_error=False))
