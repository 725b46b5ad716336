"""Counting the audit events the trail could not keep, loudly but without flooding the log.

A full inbox drops the event rather than waiting: an audit stall must not become an outage. So
every drop is counted (``total``) and handed to ``on_drop`` (the metrics), and logged at error
level rate-limited to one line per interval: an overload that drops thousands of events a second
would otherwise also flood the error log and bury everything else in it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("bridge.audit")

DropHook = Callable[[str, int], None]
"""(reason, count): reason is ``queue_full``, ``closed`` or ``write_error``."""


class DropCounter:
    """Thread-safe: the request path (any thread) and the writer thread both report drops."""

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
