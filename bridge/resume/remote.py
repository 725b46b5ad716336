"""``RemoteStream``: serving a reconnect for a stream another instance owns, from the store.

``open_remote`` checks a ``Last-Event-ID`` against the store's meta record and answers with a
reader ready to attach, or with why there is none (a value, not an exception: every answer is
an expected outcome of a reconnect).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from typing import Any

from bridge.errors import BridgeError, NotFound, ResumeStoreUnavailable, StreamExpired
from bridge.resume.client import STORE_ERRORS, ResumeStore
from bridge.resume.keys import BATCH, StoredStream, frames_key, meta_key, owner_tag, seq_of
from bridge.stream.frames import error_frame
from bridge.stream.replay import FrameLog
from bridge.stream.source import Notifier

log = logging.getLogger("bridge.resume")


class NothingLeft(enum.Enum):
    """The client already has the final frame (answered 204, which stops an EventSource)."""

    NOTHING_LEFT = "nothing_left"


async def open_remote(
    store: ResumeStore, stream_id: str, identity_key: str, after_seq: int
) -> RemoteStream | NothingLeft | BridgeError:
    """Check a reconnect against the store: a reader ready to attach, or the answer instead.

    The answer is ``NothingLeft``, ``StreamExpired`` (unknown, expired, cancelled, trimmed, never
    sent), ``NotFound`` (another caller's stream: the endpoint answers it like an unknown id) or
    ``ResumeStoreUnavailable``.
    On success the reader key is already set, so the owner's grace timer cannot fire between this
    check and the first XREAD.
    """
    try:
        meta = await store.lookup(stream_id)
    except ResumeStoreUnavailable as exc:
        return exc
    if meta is None:
        return StreamExpired("the stream is no longer available; ask again", retryable=False)
    if meta.owner != owner_tag(identity_key):
        return NotFound("no such stream", code="STREAM_NOT_FOUND")
    if meta.final_seq is not None:
        if after_seq == meta.final_seq:
            return NothingLeft.NOTHING_LEFT
        if after_seq > meta.final_seq:
            return StreamExpired("this event id was never sent", retryable=False)
    elif meta.end is not None:
        return StreamExpired("the stream expired before it was resumed", retryable=False)
    try:
        first = await store.call(store.client.xrange(frames_key(stream_id), count=1))
        if first and seq_of(first[0][0])[0] > after_seq + 1:
            return StreamExpired("the frames after this event id are no longer held", retryable=False)
        await store.hold_reader(stream_id, store.timings.reader_ttl_s, strict=True)
    except STORE_ERRORS as exc:
        store.failed("read", exc)
        return ResumeStoreUnavailable("the resume store is unavailable; retry", retryable=True, retry_after_s=1)
    store.count("remote_resumes")
    return RemoteStream(store, meta, after_seq)


class RemoteStream:
    """A reader on a non-owner instance: the store's frames as a ``FrameSource``.

    Invariants: frames are delivered in seq order with no gap (a hole, i.e. frames trimmed before
    this reader got them, ends the stream with STREAM_EXPIRED rather than skipping); at most
    ``window_frames`` are buffered here (XREAD pauses while the client is behind); the reader key
    is refreshed only while an HTTP client is attached, so a reader that leaves releases the
    owner after the grace window; an ended stream's keys are held a window past this reader's
    leaving (``ResumeStore.hold_ended``), never past their ceiling.
    """

    def __init__(self, store: ResumeStore, meta: StoredStream, after_seq: int) -> None:
        self.store = store
        self.stream_id = meta.stream_id
        self.request_id = meta.request_id
        self.policy = store.policy
        self.generation = 0
        self.finished = False
        self._next = after_seq + 1
        # Frames read but not yet written; nothing is kept once written (the store keeps them).
        self._log = FrameLog(keep_sent=False, max_frames=self.policy.window_frames, max_bytes=self.policy.buffer_bytes)
        self._log.rewind(after_seq)
        self._changed = Notifier()
        self._space = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = asyncio.Event()
        self._shut_down = False  # ended here by ``shut_down``, not by the stream

    @property
    def sent_seq(self) -> int:
        return self._log.sent_seq

    @property
    def running(self) -> bool:
        """A client is attached and its reading has not stopped."""
        return bool(self._tasks)

    async def wait_closed(self) -> None:
        await self._stopped.wait()

    def attach(self, after_seq: int) -> int | BridgeError:
        self.generation += 1
        self._log.rewind(after_seq)
        self._next = after_seq + 1
        self._stopped.clear()
        self._tasks = [self.store.spawn(self._read(f"{after_seq}-0")), self.store.spawn(self._keepalive())]
        return self.generation

    def _stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        self._stopped.set()

    def shut_down(self, error: BridgeError) -> None:
        """This instance is shutting down: end the reader now with ``error`` (a retryable
        SHUTTING_DOWN), id = the last frame delivered, and hold the owner a grace window as a
        client leaving does, so the client resumes on another instance where it left off.

        Cut by the server's shutdown instead, the response ended without a final frame, and its
        release then dropped the reader key, so the owner could cancel the stream before the
        client came back.
        """
        if not self._tasks or self.finished:
            return
        self._shut_down = True
        self._stop()
        self._leave()
        self._fail(error)

    def _leave(self) -> None:
        """Hold the owner a grace window for the client (here or anywhere), and an ended stream's
        keys a window from now."""
        self.store.spawn(self.store.hold_reader(self.stream_id, self.store.timings.grace_s))
        self.store.spawn(self.store.hold_ended(self.stream_id))  # a no-op while the owner still runs

    def detach(self, generation: int) -> None:
        """The client left: give it the grace window to come back (here or anywhere). Idempotent."""
        if generation != self.generation or not self._tasks:
            return
        self._stop()
        self._leave()

    def release(self, generation: int) -> None:
        """The final frame was written: nobody needs the owner to wait any more, unless that frame
        came from ``shut_down`` (the stream goes on; the client resumes elsewhere)."""
        if generation != self.generation:
            return
        self._stop()
        if self._shut_down:  # ``shut_down`` already held the owner for the client
            return
        self.store.spawn(self.store.drop_reader(self.stream_id))
        # Written is not received: a client cut right now may still come back for the tail.
        self.store.spawn(self.store.hold_ended(self.stream_id))

    def take(self) -> tuple[bytes, int]:
        return self._log.take()

    def acknowledge(self, seq: int, generation: int) -> None:
        if generation != self.generation:
            return
        self._log.acknowledge(seq)
        self._space.set()

    async def changed(self) -> None:
        await self._changed.wait()

    def wake(self) -> None:
        self._changed.notify()

    def _push(self, seq: int, data: bytes, final: bool = False) -> None:
        self._log.append(data, seq)
        if final:
            self.finished = True
        self._changed.notify()

    def _fail(self, error: BridgeError) -> None:
        """End with ``error`` as the final frame, id = the last frame delivered (safe to resume)."""
        last = self._next - 1
        self._push(last, error_frame(f"{self.stream_id}:{last}", error), final=True)

    async def _keepalive(self) -> None:
        """While a client is attached: hold the owner (reader key) and, once the stream ended, its
        keys (an attached reader counts as leaving now, as in the owner's registry), so a reader
        lagging behind a finished answer does not see the frames expire under it."""
        every = self.store.timings.reader_ttl_s / 3
        while True:
            await self.store.hold_reader(self.stream_id, self.store.timings.reader_ttl_s)
            await self.store.hold_ended(self.stream_id)
            await asyncio.sleep(every)  # the refresh period, not synchronisation

    async def _read(self, last_id: str) -> None:
        store = self.store
        fkey = frames_key(self.stream_id)
        block_ms = int(store.timings.block_s * 1000)
        try:
            while not self.finished:
                while self._log.unsent_frames >= self.policy.window_frames:
                    self._space.clear()
                    await self._space.wait()
                reply = await store.call(
                    store.client.xread({fkey: last_id}, count=BATCH, block=block_ms), store.timings.block_s
                )
                entries = _entries(reply)
                if not entries:
                    if not await store.call(store.client.exists(meta_key(self.stream_id))):
                        self._fail(StreamExpired("the stream is no longer available; ask again", retryable=False))
                    continue
                for entry_id, fields in entries:
                    last_id = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
                    seq, part = seq_of(last_id)
                    data = fields.get(b"d")
                    if part != 0 or data is None:  # end marker: upstream ended without a final frame
                        self.finished = True
                        self._changed.notify()
                        break
                    if seq < self._next:
                        continue
                    if seq > self._next:
                        self._fail(StreamExpired("the frames after this event id are no longer held", retryable=False))
                        break
                    self._next += 1
                    self._push(seq, data, final=b"f" in fields)
                    if self.finished:
                        break
            store.succeeded()
        except STORE_ERRORS as exc:
            store.failed("read", exc)
            self._fail(
                ResumeStoreUnavailable(
                    "the resume store is unavailable; reconnect to continue", retryable=True, retry_after_s=1
                )
            )
        except Exception:  # a bug must still end the stream with a frame, not heartbeat forever
            log.exception("stream %s: remote reader failed", self.stream_id)
            self._fail(BridgeError("internal error in the bridge", code="INTERNAL", retryable=True))


def _entries(reply: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """XREAD's answer for our one key (RESP2, the protocol this pool speaks: ``[[key, entries]]``)."""
    if not reply:
        return []
    return list(reply[0][1])
