"""Retention purges off the writer thread: verify on a read snapshot, delete as one writer task.

Retention verifies the whole chain before it purges (bridge/audit/retention.py), which is O(n).
Run on the writer thread, a purge of a large store would stall writing until the inbox filled and
events were dropped; so verification runs in a thread of its own and only the delete itself is
queued for the writer, which keeps every write to the store on one thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from datetime import datetime

from bridge.audit.anchor import SealedHeadFile
from bridge.audit.chain import Chain
from bridge.audit.events import format_ts, retention_cutoff
from bridge.audit.inbox import Inbox, Task
from bridge.audit.retention import checkpoint_builder, plan_purge, sealed_heads
from bridge.audit.store import AuditStore
from bridge.errors import AuditChainBroken

log = logging.getLogger("bridge.audit")


class RetentionPurger:
    """Purges of one trail's store; at most one background purge runs at a time."""

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
