"""Refused requests folded into a bounded number of audit records per window.

A record per refused request would let anyone fill the audit store: every bad token an
``auth_failed`` record and every 429 a ``rate_limited`` one, each kept for the whole retention,
written as fast as one client can send requests. ``RefusalLedger`` keeps, per (event type,
subject, reason) and per fixed window of ``window_s`` (AUDIT_REFUSAL_WINDOW_S):

* the first refusal, written at once (``count`` 1): an attack shows in the trail immediately;
* every later one, only counted; ONE record with ``count`` and ``first_ts`` is written when the
  window closes (a timer on the event loop), or at ``aclose`` so a clean stop loses no count.

One subject therefore leaves at most two records per reason and window, whatever its rate; the
sum of ``count`` over the records is the number of refusals.

The subject is the caller's identity key when it has one (a verified token or a trusted proxy's
``x-user-id``), else its address block (``bridge.clientip.address_block``: an IPv6 /64), so a
client cycling the addresses of its /64 is one subject, recorded with the block as ``client_ip``.

Memory is bounded as refusals arrive: at most ``max_entries`` entries per window. A refusal
from a further subject is folded into one overflow entry per (event type, reason) whose
``client_ip`` is ``*``; a flood from many addresses then costs at most
``2 * (max_entries + overflow entries)`` records per window instead of one per address.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from bridge.audit.events import SecurityKind
from bridge.audit.trail import AuditTrail
from bridge.clientip import address_block, counting_key
from bridge.types import Identity

log = logging.getLogger("bridge.audit")

DEFAULT_MAX_ENTRIES = 4096
OVERFLOW_ADDRESS = "*"
MAX_PATH_CHARS = 256  # a path is client-chosen (a cancel's stream id): bounded in memory and on disk

_Key = tuple[SecurityKind, str, str]  # (event type, subject, reason)


@dataclass(slots=True)
class _Pending:
    """One (event type, subject, reason) in the current window, after its first refusal was written."""

    identity: Identity
    path: str
    request_id: str
    trace_id: str | None
    first_ts: str = ""
    count: int = 0  # refusals since the written one, not yet in any record


class RefusalLedger:
    """Folds refusals into at most two records per (event type, subject, reason) and window.

    ``clock`` is monotonic seconds; windows are aligned to multiples of ``window_s`` on it, so
    every entry of a window closes at once and one timer serves them all.
    """

    def __init__(
        self,
        trail: AuditTrail,
        window_s: float,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if window_s <= 0 or max_entries < 1:
            raise ValueError("window_s must be > 0 and max_entries >= 1")
        self._trail = trail
        self._window_s = window_s
        self._max_entries = max_entries
        self._clock = clock
        self._entries: dict[_Key, _Pending] = {}
        self._window_end = self._next_boundary(clock())
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._overflow_logged = False

    def __len__(self) -> int:
        return len(self._entries)

    def refused(
        self,
        kind: SecurityKind,
        identity: Identity,
        *,
        request_id: str,
        trace_id: str | None,
        path: str,
        reason: str,
    ) -> None:
        """Account for one refused request; writes a record only for the first of its window."""
        now = self._clock()
        if now >= self._window_end:
            self._roll(now)
        subject, shown = _subject(identity)
        key: _Key = (kind, subject, reason)
        entry = self._entries.get(key)
        if entry is None and len(self._entries) >= self._max_entries:
            key = (kind, OVERFLOW_ADDRESS, reason)
            shown = Identity(client_ip=OVERFLOW_ADDRESS)
            entry = self._entries.get(key)
            self._log_overflow()
        path = path[:MAX_PATH_CHARS]
        if entry is None:
            events = self._trail.events
            self._trail.record(events.security(kind, shown, request_id, trace_id, path, reason))
            if not self._closed:  # overflow entries may exceed max_entries by the few overflow keys
                self._entries[key] = _Pending(shown, path, request_id, trace_id)
                self._arm()
            return
        if entry.count == 0:  # the first folded refusal names the aggregate record
            entry.first_ts = self._trail.events.now()
            entry.path, entry.request_id, entry.trace_id = path, request_id, trace_id
        entry.count += 1

    def flush(self) -> int:
        """Write every folded count now and start a new window; returns how many records were written."""
        return self._roll(self._clock())

    async def aclose(self) -> None:
        """Write every folded count (call before the trail closes); later refusals are written one by one."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()
        self._closed = True

    # -- windows ---------------------------------------------------------------------------------

    def _next_boundary(self, now: float) -> float:
        return (math.floor(now / self._window_s) + 1) * self._window_s

    def _roll(self, now: float) -> int:
        written = 0
        events = self._trail.events
        for (kind, _, reason), entry in self._entries.items():
            if entry.count:
                self._trail.record(
                    events.security(
                        kind,
                        entry.identity,
                        entry.request_id,
                        entry.trace_id,
                        entry.path,
                        reason,
                        entry.count,
                        entry.first_ts,
                    )
                )
                written += 1
        self._entries.clear()
        self._window_end = self._next_boundary(now)
        self._overflow_logged = False
        return written

    def _arm(self) -> None:
        """Close the window on time even if no further refusal arrives (no loop: ``flush`` does it)."""
        if self._timer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._timer = loop.call_later(max(0.0, self._window_end - self._clock()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._clock() >= self._window_end:
            self._roll(self._clock())
        elif self._entries:  # woke a hair early against our clock
            self._arm()

    def _log_overflow(self) -> None:
        if not self._overflow_logged:
            self._overflow_logged = True
            log.warning(
                "refusals from more than %d subjects this window; further ones are recorded under client_ip %r",
                self._max_entries,
                OVERFLOW_ADDRESS,
            )


def _subject(identity: Identity) -> tuple[str, Identity]:
    """(key in the ledger, identity the records show): an anonymous caller is shown as its block."""
    shown = identity if identity.user_id else Identity(client_ip=address_block(identity.client_ip))
    return counting_key(identity), shown
