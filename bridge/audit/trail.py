"""``AuditTrail``: the request path hands events to ``record`` and moves on.

A dedicated writer thread, not an asyncio task + ``to_thread``, does all SQLite writing:

* ``record`` can be called from any thread (gRPC callbacks, sync code), not just the event loop;
* SQLite work (fsync at checkpoints, purges with secure_delete) never runs on the loop;
* at shutdown the thread drains the inbox even while the loop is tearing down its default
  executor, so events queued before SIGTERM are written (``aclose`` waits for exactly that).

A full inbox drops the event rather than waiting: an audit stall must not become an outage. Every
drop is counted (``dropped``), reported to ``on_drop`` (metrics) and logged, rate-limited so an
overload does not also flood the error log.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

from bridge.audit.chain import Chain, VerifyResult, verify
from bridge.audit.events import AuditEvent, EventFactory, checkpoint_event, format_ts, utc_now
from bridge.audit.inbox import Inbox, Task
from bridge.audit.keys import AuditKeys, load_keys
from bridge.audit.store import AuditStore, Link, QueryFilters, SQLiteStore, StoredRecord
from bridge.config import Settings

log = logging.getLogger("bridge.audit")

DropHook = Callable[[str, int], None]
"""(reason, count): reason is ``queue_full``, ``closed`` or ``write_error``."""


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
    ) -> None:
        self.store = store
        self.keys = keys
        self.events = EventFactory(keys, clock)
        self.retention_days = retention_days
        self.purge_interval_s = purge_interval_s
        self.dropped = 0
        self.write_errors = 0
        self._chain = Chain(keys.chain_key)
        self._clock = clock
        self._batch_size = batch_size
        self._on_drop = on_drop
        self._inbox = Inbox(queue_size)
        self._thread: threading.Thread | None = None
        self._stopped: Task | None = None
        self._current: Task | None = None
        self._inflight = 0
        self._drop_lock = threading.Lock()
        self._drop_log_interval_s = drop_log_interval_s
        self._drops_unreported = 0
        self._drop_logged_at = -float("inf")
        self._status: tuple[float, VerifyResult] | None = None

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> AuditTrail:
        """The trail for AUDIT_DB / AUDIT_HASH_KEY / AUDIT_RETENTION_DAYS / AUDIT_QUEUE_SIZE."""
        keys = load_keys(settings.audit_db, settings.audit_hash_key)
        return cls(SQLiteStore(settings.audit_db), keys, retention_days=settings.audit_retention_days,
                   queue_size=settings.audit_queue_size, **kwargs)

    @property
    def queued(self) -> int:
        return len(self._inbox)

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
        now = time.monotonic()
        with self._drop_lock:
            self.dropped += count
            self._drops_unreported += count
            report = now - self._drop_logged_at >= self._drop_log_interval_s
            if report:
                unreported, self._drops_unreported, self._drop_logged_at = self._drops_unreported, 0, now
        if report:
            log.error("AUDIT EVENTS DROPPED (%s): %d since the last report, %d in total; the audit trail "
                      "is incomplete", reason, unreported, self.dropped)
        if self._on_drop is not None:
            try:
                self._on_drop(reason, count)
            except Exception:
                log.exception("audit on_drop hook failed")

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the writer and a retention purge in the background."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()
        self._inbox.submit(Task(self._purge_logged))

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
        """Delete records older than the retention (or ``older_than_days``); returns how many."""
        days = self.retention_days if older_than_days is None else older_than_days
        result: int = await self._submit(Task(lambda: self._purge_now(days)))
        return result

    async def _submit(self, task: Task) -> Any:
        if self._thread is None or self._inbox.closed:
            raise RuntimeError("the audit trail is not running")
        self._inbox.submit(task)
        return await asyncio.wrap_future(task.future)

    # -- reads ----------------------------------------------------------------------------------

    async def query(self, filters: QueryFilters, limit: int = 100, offset: int = 0) -> list[StoredRecord]:
        return await asyncio.to_thread(self.store.query, filters, limit, offset)

    async def verify(self) -> VerifyResult:
        result = await asyncio.to_thread(verify, self.store, self.keys.chain_key)
        self._status = (time.monotonic(), result)
        return result

    async def chain_status(self, max_age_s: float = 60.0) -> VerifyResult:
        """The last verify result if younger than ``max_age_s``, else a fresh one (verify is O(n))."""
        if self._status is not None and time.monotonic() - self._status[0] < max_age_s:
            return self._status[1]
        return await self.verify()

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
            events, task = self._inbox.take(self._batch_size, None)
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
        next_purge = time.monotonic() + self.purge_interval_s
        while True:
            events, task = self._inbox.take(self._batch_size, max(0.0, next_purge - time.monotonic()))
            self._current, self._inflight = task, len(events)
            if events:
                self._write(events)
            self._inflight = 0
            if task is None and 0 < len(events) < self._batch_size:
                # Let a batch gather: one transaction and one wake-up per ~20 ms instead of one per
                # event keeps the writer thread (and its GIL hand-offs) off the streams' core.
                time.sleep(_LINGER_S)
            if task is not None:
                self._finish(task)
                if task.stop:
                    return
            if time.monotonic() >= next_purge:
                self._purge_logged()
                next_purge = time.monotonic() + self.purge_interval_s

    def _finish(self, task: Task) -> None:
        try:
            result = task.run() if task.run is not None else None
            if task.stop:
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

    def _purge_now(self, days: int) -> int:
        cutoff = format_ts(self._clock() - timedelta(days=days))

        def checkpoint(count: int, last: Link) -> Mapping[str, Any]:
            return checkpoint_event(format_ts(self._clock()), count, last.id, last.hash, cutoff).body

        count = self.store.purge_before(cutoff, self._chain, checkpoint)
        if count:
            log.info("audit retention: purged %d records older than %s", count, cutoff)
        return count

    def _purge_logged(self) -> None:
        try:
            self._purge_now(self.retention_days)
        except Exception:
            log.exception("audit retention purge failed")
