"""``AuditTrail``: the request path hands events to ``record`` and moves on.

A dedicated writer thread, not an asyncio task + ``to_thread``, does all SQLite writing:

* ``record`` can be called from any thread (gRPC callbacks, sync code), not just the event loop;
* SQLite work (fsync at checkpoints, purges with secure_delete) never runs on the loop;
* at shutdown the thread drains the inbox even while the loop is tearing down its default
  executor, so events queued before SIGTERM are written (``aclose`` waits for exactly that).

The writer takes its work from an ``Inbox``: a bounded queue of events plus a lane for control
tasks (flush, close, a purge's delete), each run after every event accepted before it.

Retention purges verify off the writer thread (``RetentionPurger``), so a purge of a large store
never stalls writing; which records may go is decided by bridge/audit/retention.py. The writer
anchors the chain head (bridge/audit/anchor.py) at start, every ``head_interval_s`` and at
shutdown.

A full inbox drops the event rather than waiting: an audit stall must not become an outage. Every
drop is counted, reported and logged without flooding the log (``DropCounter``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from bridge.audit.anchor import HeadAnchor, HeadSigner, SealedHeadFile, head_path
from bridge.audit.chain import Chain, VerifyResult, verify
from bridge.audit.events import AuditEvent, EventFactory, format_ts, retention_cutoff, utc_now
from bridge.audit.keys import AuditKeys, load_keys
from bridge.audit.retention import checkpoint_builder, plan_purge, sealed_heads
from bridge.audit.store import AuditStore, QueryFilters, SQLiteStore, StoredRecord
from bridge.config import Settings
from bridge.errors import AuditChainBroken

log = logging.getLogger("bridge.audit")

_LINGER_S = 0.02


class AuditTrail:
    """Queue, writer thread, retention and reads over one ``AuditStore``."""

    def __init__(
        self,
        store: AuditStore,
        keys: AuditKeys,
        *,
        retention_days: int = 90,
        queue_size: int = 10_000,
        purge_interval_s: float = 3600.0,
        batch_size: int = 500,
        on_drop: DropHook | None = None,
        clock: Callable[[], datetime] = utc_now,
        drop_log_interval_s: float = 10.0,
        sealed: SealedHeadFile | None = None,
        head_interval_s: float = 60.0,
        retention: bool = True,
    ) -> None:
        """``retention``: run the retention purges (at start and every ``purge_interval_s``); off in
        every worker but the primary, which purges the one store for all of them."""
        self.store = store
        self.retention = retention
        self.keys = keys
        self.events = EventFactory(keys, clock)
        self.retention_days = retention_days
        self.purge_interval_s = purge_interval_s
        self.write_errors = 0
        self._chain = Chain(keys.chain_key)
        self._clock = clock
        self._batch_size = batch_size
        self._drops = DropCounter(on_drop, drop_log_interval_s)
        self._inbox = Inbox(queue_size)
        self._thread: threading.Thread | None = None
        self._stopped: Task | None = None
        self._current: Task | None = None
        self._inflight = 0
        self._status: tuple[float, VerifyResult] | None = None
        self._sealed = sealed
        self.head_interval_s = head_interval_s
        self.anchor = HeadAnchor(
            store, self._chain, HeadSigner(keys.head_key), sealed, lambda: format_ts(self._clock())
        )
        self._purger = RetentionPurger(store, keys.chain_key, self._chain, self._inbox, sealed, clock)

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> AuditTrail:
        """The trail for AUDIT_DB / AUDIT_HASH_KEY / AUDIT_RETENTION_DAYS / AUDIT_QUEUE_SIZE /
        AUDIT_HEAD_INTERVAL_S; heads are sealed to ``<AUDIT_DB>.head``.

        The store is opened first: a store path the bridge refuses (``UnsafeFile``) leaves no
        generated key behind."""
        store = SQLiteStore(settings.audit_db)
        try:
            keys = load_keys(settings.audit_db, settings.audit_hash_key)
        except BaseException:
            store.close()
            raise
        sealed = SealedHeadFile(head_path(settings.audit_db), HeadSigner(keys.head_key))
        return cls(
            store,
            keys,
            retention_days=settings.audit_retention_days,
            queue_size=settings.audit_queue_size,
            sealed=sealed,
            head_interval_s=settings.audit_head_interval_s,
            **kwargs,
        )

    @property
    def queued(self) -> int:
        return len(self._inbox)

    @property
    def dropped(self) -> int:
        """Events lost so far (queue full, closed, or a failed write)."""
        return self._drops.total

    @property
    def background_purge(self) -> Future[int] | None:
        """The latest background retention purge (start-up or scheduled), for tests and status."""
        return self._purger.background

    # -- request path ---------------------------------------------------------------------------

    def record(self, event: AuditEvent) -> bool:
        """Queue ``event``; False if it was dropped. Never blocks, never raises."""
        try:
            if self._inbox.offer(event):
                return True
            self._dropped("closed" if self._inbox.closed else "queue_full", 1)
        except Exception:  # the audit trail must never fail a request
            log.exception("audit record failed")
        return False

    def _dropped(self, reason: str, count: int) -> None:
        self._drops.add(reason, count)

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the writer and a retention purge in the background."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()
        if self.retention:
            self._purger.in_background(self.retention_days)

    async def flush(self) -> None:
        """Return once every event queued before the call is written."""
        await self._submit(Task())

    async def aclose(self) -> None:
        """Write everything queued, stop the writer, close the store. Later records are dropped."""
        if self._stopped is None:
            self._stopped = Task(stop=True)
            self._inbox.submit(self._stopped, close=True)
            if self._thread is None:  # never started: run the writer just to drain what was queued
                self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
                self._thread.start()
        await asyncio.wrap_future(self._stopped.future)

    async def purge(self, older_than_days: int | None = None) -> int:
        """Delete records older than the retention (or ``older_than_days``); returns how many.

        Everything queued before the call is written first. AuditChainBroken if the chain does
        not verify: then nothing is deleted.
        """
        await self.flush()
        days = self.retention_days if older_than_days is None else older_than_days
        return await asyncio.to_thread(self._purger.now, days)

    async def _submit(self, task: Task) -> Any:
        if self._thread is None or self._inbox.closed:
            raise RuntimeError("the audit trail is not running")
        self._inbox.submit(task)
        return await asyncio.wrap_future(task.future)

    # -- reads ----------------------------------------------------------------------------------

    async def query(self, filters: QueryFilters, limit: int = 100, offset: int = 0) -> list[StoredRecord]:
        return await asyncio.to_thread(self.store.query, filters, limit, offset)

    async def verify(self) -> VerifyResult:
        result = await asyncio.to_thread(self._verify_now)
        self._status = (time.monotonic(), result)
        return result

    async def chain_status(self, max_age_s: float = 60.0) -> VerifyResult:
        """The last verify result if younger than ``max_age_s``, else a fresh one (verify is O(n))."""
        if self._status is not None and time.monotonic() - self._status[0] < max_age_s:
            return self._status[1]
        return await self.verify()

    def _verify_now(self) -> VerifyResult:
        try:
            heads = sealed_heads(self._sealed)
        except AuditChainBroken as exc:
            return VerifyResult(False, 0, None, exc.reason)
        return verify(self.store, self.keys.chain_key, heads)

    # -- writer thread --------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:  # a dead writer must not leave aclose()/flush() waiting forever
            log.critical("audit writer crashed; the audit trail is no longer recording", exc_info=True)
            if self._inflight:  # the batch being written when it died
                self._dropped("write_error", self._inflight)
            if self._current is not None and not self._current.future.done():  # taken, not finished
                self._fail(self._current)
            self._fail_loop()

    def _fail_loop(self) -> None:
        """After a crash: count queued events as dropped, fail flushes, still honour aclose."""
        while True:
            events, task = self._inbox.take(self._batch_size, _LINGER_S)  # events do not wake it
            if events:
                self._dropped("write_error", len(events))
            if task is not None and self._fail(task):
                return

    def _fail(self, task: Task) -> bool:
        """Fail a flush or purge; a stop still closes the store. True for a stop."""
        if task.stop:
            self._finish(task)
        else:
            task.future.set_exception(RuntimeError("the audit writer crashed"))
        return task.stop

    def _loop(self) -> None:
        self.anchor.anchor()
        next_purge = time.monotonic() + self.purge_interval_s
        next_head = time.monotonic() + self.head_interval_s
        while True:
            wait = min(next_purge, next_head) - time.monotonic()
            # Events do not wake the writer (see Inbox.offer): it looks every _LINGER_S.
            events, task = self._inbox.take(self._batch_size, min(max(0.0, wait), _LINGER_S))
            self._current, self._inflight = task, len(events)
            if events:
                self._write(events)
            self._inflight = 0
            if task is None and 0 < len(events) < self._batch_size:
                # Let a batch gather: one transaction and one wake-up per _LINGER_S instead of one
                # per event keeps the writer thread (and its GIL hand-offs) off the streams' core.
                time.sleep(_LINGER_S)
            if task is not None:
                self._finish(task)
                if task.stop:
                    return
            if time.monotonic() >= next_head:
                self.anchor.anchor()
                next_head = time.monotonic() + self.head_interval_s
            if time.monotonic() >= next_purge and self.retention:
                self._purger.in_background(self.retention_days)
                next_purge = time.monotonic() + self.purge_interval_s

    def _finish(self, task: Task) -> None:
        try:
            result = task.run() if task.run is not None else None
            if task.stop:
                self.anchor.anchor()  # the final head: a later truncation of the tail is caught
                self.store.close()
        except BaseException as exc:
            task.future.set_exception(exc)
        else:
            task.future.set_result(result)

    def _write(self, events: list[AuditEvent]) -> None:
        try:
            self.store.append_batch([e.body for e in events], self._chain)
            return
        except Exception:
            if len(events) == 1:
                log.exception("audit write failed; 1 event lost")
                self.write_errors += 1
                self._dropped("write_error", 1)
                return
        for event in events:  # one bad event (or a transient error) must not lose the whole batch
            self._write([event])


# ------------------------------------------------------------------------------ the writer's inbox
@dataclass(slots=True)
class Task:
    """Work for the writer thread, run after all events queued before it are written."""

    run: Callable[[], Any] | None = None
    stop: bool = False
    future: Future[Any] = field(default_factory=Future)


class Inbox:
    """The writer's inbox: a bounded queue of events plus an unbounded lane for control tasks.

    Why not ``queue.Queue``: a flush or shutdown marker must get in even when the queue is full of
    events (otherwise ``aclose`` would block, or drop its own marker, exactly under overload), and it
    must be ordered after every event accepted before it, so "flushed" really means written.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: deque[AuditEvent | Task] = deque()
        self._events = 0
        self._closed = False
        self._cond = threading.Condition(threading.Lock())

    def offer(self, event: AuditEvent) -> bool:
        """Queue an event unless full or closed; O(1) and never waits beyond a short lock.

        It does not wake the writer, which looks every few milliseconds instead: waking it would
        make the writer thread take the GIL (and the core) right after a stream's start is
        recorded, in the very moments that stream's first token is being read and written. Tasks (flush,
        close) still wake it at once.
        """
        with self._cond:
            if self._closed or self._events >= self.capacity:
                return False
            self._items.append(event)
            self._events += 1
            return True

    def submit(self, task: Task, *, close: bool = False) -> None:
        """Queue a control task regardless of capacity; ``close`` refuses all later events."""
        with self._cond:
            self._closed = self._closed or close
            self._items.append(task)
            self._cond.notify()

    def submit_unless_closed(self, task: Task) -> bool:
        """Queue a task only while open: a task queued after the stop marker would never run."""
        with self._cond:
            if self._closed:
                return False
            self._items.append(task)
            self._cond.notify()
            return True

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return self._events

    def take(self, max_events: int, timeout: float | None) -> tuple[list[AuditEvent], Task | None]:
        """Wait up to ``timeout`` for work; return queued events up to the first task, and that task."""
        with self._cond:
            if not self._items:
                self._cond.wait(timeout)
            events: list[AuditEvent] = []
            while self._items and len(events) < max_events:
                item = self._items.popleft()
                if isinstance(item, Task):
                    self._events -= len(events)
                    return events, item
                events.append(item)
            self._events -= len(events)
            return events, None


# ---------------------------------------------------------------------------------- dropped events

DropHook = Callable[[str, int], None]
"""(reason, count): reason is ``queue_full``, ``closed`` or ``write_error``."""


class DropCounter:
    """Counts the audit events the trail could not keep, loudly but without flooding the log.

    A full inbox drops the event rather than waiting: an audit stall must not become an outage. So
    every drop is counted (``total``) and handed to ``on_drop`` (the metrics), and logged at error
    level rate-limited to one line per interval: an overload that drops thousands of events a second
    would otherwise also flood the error log and bury everything else in it.

    Thread-safe: the request path (any thread) and the writer thread both report drops.
    """

    __slots__ = ("_lock", "_log_interval_s", "_logged_at", "_on_drop", "_unreported", "total")

    def __init__(self, on_drop: DropHook | None, log_interval_s: float) -> None:
        self.total = 0
        self._on_drop = on_drop
        self._log_interval_s = log_interval_s
        self._lock = threading.Lock()
        self._unreported = 0
        self._logged_at = -float("inf")

    def add(self, reason: str, count: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.total += count
            self._unreported += count
            report = now - self._logged_at >= self._log_interval_s
            if report:
                unreported, self._unreported, self._logged_at = self._unreported, 0, now
        if report:
            log.error(
                "AUDIT EVENTS DROPPED (%s): %d since the last report, %d in total; the audit trail is incomplete",
                reason,
                unreported,
                self.total,
            )
        if self._on_drop is not None:
            try:
                self._on_drop(reason, count)
            except Exception:
                log.exception("audit on_drop hook failed")


# ---------------------------------------------------------- retention purges off the writer thread


class RetentionPurger:
    """Retention purges of one trail's store off the writer thread: verify on a read snapshot,
    delete as one writer task; at most one background purge runs at a time.

    Retention verifies the whole chain before it purges (bridge/audit/retention.py), which is O(n).
    Run on the writer thread, a purge of a large store would stall writing until the inbox fills
    and events are dropped; so verification runs in a thread of its own and only the delete itself
    is queued for the writer, which keeps every write to the store on one thread.
    """

    __slots__ = ("_chain", "_chain_key", "_clock", "_inbox", "_sealed", "_store", "background")

    def __init__(
        self,
        store: AuditStore,
        chain_key: bytes,
        chain: Chain,
        inbox: Inbox,
        sealed: SealedHeadFile | None,
        clock: Callable[[], datetime],
    ) -> None:
        self._store = store
        self._chain_key = chain_key
        self._chain = chain
        self._inbox = inbox
        self._sealed = sealed
        self._clock = clock
        self.background: Future[int] | None = None
        """The latest background purge (start-up or scheduled), for tests and status."""

    def in_background(self, days: int) -> None:
        """Start a retention purge in its own thread unless one is still running."""
        if self.background is not None and not self.background.done():
            return
        future: Future[int] = Future()
        self.background = future
        threading.Thread(target=self._logged, args=(days, future), name="audit-purge", daemon=True).start()

    def _logged(self, days: int, future: Future[int]) -> None:
        try:
            future.set_result(self.now(days))
        except AuditChainBroken as exc:
            log.critical("AUDIT RETENTION PURGE REFUSED: %s; nothing was deleted", exc)
            future.set_exception(exc)
        except BaseException as exc:
            log.exception("audit retention purge failed")
            future.set_exception(exc)

    def now(self, days: int) -> int:
        """Verify on a read snapshot (this thread), then delete on the writer thread."""
        cutoff = retention_cutoff(self._clock(), days)
        last = plan_purge(self._store, self._chain_key, sealed_heads(self._sealed), cutoff)
        if last is None:
            return 0
        build = checkpoint_builder(lambda: format_ts(self._clock()), cutoff)
        task = Task(lambda: self._store.purge_through(last, self._chain, build))
        if not self._inbox.submit_unless_closed(task):
            return 0  # shutting down: the next start purges
        count: int = task.future.result()
        if count:
            log.info("audit retention: purged %d records older than %s", count, cutoff)
        return count
