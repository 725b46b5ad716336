"""``AuditTrail``: the request path hands events to ``record`` and moves on.

A dedicated writer thread, not an asyncio task + ``to_thread``, does all SQLite writing:

* ``record`` can be called from any thread (gRPC callbacks, sync code), not just the event loop;
* SQLite work (fsync at checkpoints, purges with secure_delete) never runs on the loop;
* at shutdown the thread drains the inbox even while the loop is tearing down its default
  executor, so events queued before SIGTERM are written (``aclose`` waits for exactly that).

Retention purges verify off the writer thread (bridge/audit/purger.py), so a purge of a large
store never stalls writing. The writer anchors the chain head (bridge/audit/anchor.py) at start,
every ``head_interval_s`` and at shutdown.

A full inbox drops the event rather than waiting: an audit stall must not become an outage. Every
drop is counted, reported and logged without flooding the log (bridge/audit/drops.py).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from datetime import datetime
from typing import Any

from bridge.audit.anchor import HeadAnchor, HeadSigner, SealedHeadFile, head_path
from bridge.audit.chain import Chain, VerifyResult, verify
from bridge.audit.drops import DropCounter, DropHook
from bridge.audit.events import AuditEvent, EventFactory, format_ts, utc_now
from bridge.audit.inbox import Inbox, Task
from bridge.audit.keys import AuditKeys, load_keys
from bridge.audit.purger import RetentionPurger
from bridge.audit.retention import sealed_heads
from bridge.audit.store import AuditStore, QueryFilters, SQLiteStore, StoredRecord
from bridge.config import Settings
from bridge.errors import AuditChainBroken

log = logging.getLogger("bridge.audit")

__all__ = ["AuditTrail", "DropHook"]

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
                # Let a batch gather: one transaction and one wake-up per ~20 ms instead of one per
                # event keeps the writer thread (and its GIL hand-offs) off the streams' core.
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
