"""Audit events, built only through ``EventFactory`` so the GDPR field rules live in one place.

Rules (each enforced here, and asserted per event type by tests/unit/audit/test_events.py):

* the query is stored only as ``query_hmac`` (keyed HMAC-SHA256), never raw: a plain SHA-256 of
  a short query is reversible by guessing, a keyed one is not without the key;
* ``user_id`` is pseudonymous: the verified (or trusted-proxy) user id when there is one, else
  ``anon:<HMAC of the IP>``, so anonymous callers are still correlatable without storing the IP;
* ``identity_kind`` says how that id was established (``token``, ``proxy`` or ``anonymous``):
  without it a caller whose ``x-user-id: alice`` a proxy passed on would be recorded exactly like the
  verified token user ``alice``;
* ``email`` only when ``Identity.authenticated`` (an unverified email is neither needed nor trusted);
* ``client_ip`` only on the security events ``rate_limited`` and ``auth_failed``;
* a security event stands for ``count`` refusals, the first at ``first_ts`` (a single refusal:
  ``count`` 1, ``first_ts`` equal to ``ts``). One record per refused request let any client fill
  the store; bridge/audit/refusals.py folds repeats into one record per window.

Every record carries exactly the keys in ``ALLOWED_FIELDS[event_type]`` (``email`` being the
one optional key), so a new field cannot leak into the store without editing that table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, Literal

from bridge.audit.keys import AuditKeys
from bridge.types import Identity, StreamResult

StreamKind = Literal["stream_started", "stream_completed", "stream_cancelled", "stream_failed"]
SecurityKind = Literal["rate_limited", "auth_failed"]

_BASE = frozenset({"ts", "event_type", "request_id", "trace_id", "user_id", "identity_kind"})
_STREAM_END = _BASE | {"query_hmac", "tokens", "first_token_ms", "duration_ms", "outcome"}
_SECURITY = _BASE | {"client_ip", "path", "reason", "count", "first_ts"}
ALLOWED_FIELDS: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        "stream_started": _BASE | {"query_hmac"},
        "stream_completed": _STREAM_END,
        "stream_cancelled": _STREAM_END,
        "stream_failed": _STREAM_END | {"error_code"},
        "chat": _BASE | {"query_hmac", "tokens", "duration_ms", "outcome", "error_code"},
        "rate_limited": _SECURITY,
        "auth_failed": _SECURITY,
        "admin_read": _BASE | {"filters", "returned"},
        "retention_checkpoint": frozenset(
            {"ts", "event_type", "purged_count", "last_purged_id", "last_purged_hash", "purged_before"}
        ),
    }
)
OPTIONAL_FIELDS = frozenset({"email"})
SECURITY_EVENTS = frozenset({"rate_limited", "auth_failed"})
_END_KIND: Mapping[str, StreamKind] = {
    "completed": "stream_completed",
    "cancelled": "stream_cancelled",
    "error": "stream_failed",
}


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One record ready to store: a read-only JSON object with ``ts`` and ``event_type``."""

    body: Mapping[str, Any]

    @property
    def event_type(self) -> str:
        return str(self.body["event_type"])


def utc_now() -> datetime:
    return datetime.now(UTC)


EARLIEST_TS = "0001-01-01T00:00:00.000000Z"
LATEST_TS = "9999-12-31T23:59:59.999999Z"
"""The range of ``format_ts``: what a UTC ``datetime`` can hold."""


def format_ts(moment: datetime) -> str:
    """Fixed-width UTC ISO 8601 with microseconds, so text order is time order in SQL.

    The year is always four digits: ``strftime("%Y")`` writes year 999 as ``999``, which sorts
    after ``2025`` as text, so a ``since`` before year 1000 would match no record at all.
    OverflowError if the instant, moved to UTC, falls outside ``EARLIEST_TS..LATEST_TS``.
    """
    if moment.tzinfo is None:
        raise ValueError("audit timestamps must be timezone-aware")
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_ts(text: str) -> str:
    """Normalise an ISO 8601 instant (``Z`` or offset; naive means UTC) to ``format_ts`` form.

    ValueError for anything else, including an instant that is valid where it was written but
    not in UTC (``0001-01-01T00:00:00+01:00`` is before the first representable UTC instant): the
    overflow must be a bad value, not an error escaping to the caller.
    """
    moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    try:
        return format_ts(moment if moment.tzinfo else moment.replace(tzinfo=UTC))
    except OverflowError:
        raise ValueError(f"{text!r} is outside {EARLIEST_TS}..{LATEST_TS}") from None


def retention_cutoff(now: datetime, days: int) -> str:
    """``format_ts(now - days)``: records older than this are past a retention of ``days`` days.

    A retention reaching back before ``EARLIEST_TS`` keeps everything (the cutoff is
    ``EARLIEST_TS``, older than any record) instead of overflowing in the purge. A negative
    ``days`` is a ValueError: its cutoff lies in the future and would purge records not yet written.
    """
    if days < 0:
        raise ValueError(f"a retention of {days} days is negative")
    try:
        return format_ts(now - timedelta(days=days))
    except OverflowError:
        return EARLIEST_TS


def checkpoint_event(
    ts: str, purged_count: int, last_purged_id: int, last_purged_hash: str, purged_before: str
) -> AuditEvent:
    """The record a retention purge leaves behind, vouching for the deleted chain prefix."""
    return _seal(
        {
            "ts": ts,
            "event_type": "retention_checkpoint",
            "purged_count": purged_count,
            "last_purged_id": last_purged_id,
            "last_purged_hash": last_purged_hash,
            "purged_before": purged_before,
        }
    )


class EventFactory:
    """Builds every event kind from an ``Identity``; the only way request code makes audit events."""

    def __init__(self, keys: AuditKeys, clock: Callable[[], datetime] = utc_now) -> None:
        self._keys = keys
        self._clock = clock

    def user_id(self, identity: Identity) -> str:
        """The pseudonymous user id stored for ``identity`` (also used to filter admin reads)."""
        return identity.user_id if identity.user_id else self._keys.pseudonym(identity.client_ip)

    def stream(
        self,
        kind: StreamKind,
        identity: Identity,
        request_id: str,
        trace_id: str | None,
        query: str,
        result: StreamResult | None = None,
    ) -> AuditEvent:
        """A stream lifecycle event; the end kinds take their measurements from ``result``."""
        body = self._base(kind, identity, request_id, trace_id)
        body["query_hmac"] = self._keys.query_hmac(query)
        if kind != "stream_started":
            body.update(
                tokens=result.tokens if result else None,
                first_token_ms=_ms(result.first_token_ms) if result else None,
                duration_ms=_ms(result.duration_ms) if result else None,
                outcome=result.outcome if result else None,
            )
        if kind == "stream_failed":
            body["error_code"] = result.error_code if result else None
        return _seal(body)

    def stream_ended(self, identity: Identity, query: str, result: StreamResult) -> AuditEvent:
        """The end event matching ``result.outcome`` (completed, cancelled or failed)."""
        return self.stream(_END_KIND[result.outcome], identity, result.request_id, result.trace_id, query, result)

    def chat(
        self,
        identity: Identity,
        request_id: str,
        trace_id: str | None,
        query: str,
        *,
        outcome: str,
        duration_ms: float,
        tokens: int | None = None,
        error_code: str | None = None,
    ) -> AuditEvent:
        """A non-streaming chat request."""
        body = self._base("chat", identity, request_id, trace_id)
        body.update(
            query_hmac=self._keys.query_hmac(query),
            tokens=tokens,
            duration_ms=_ms(duration_ms),
            outcome=outcome,
            error_code=error_code,
        )
        return _seal(body)

    def admin_read(
        self, identity: Identity, request_id: str, trace_id: str | None, *, filters: Mapping[str, str], returned: int
    ) -> AuditEvent:
        """An admin reading the trail; ``filters`` must already be pseudonymised (no raw IP)."""
        body = self._base("admin_read", identity, request_id, trace_id)
        body.update(filters=dict(filters), returned=returned)
        return _seal(body)

    def security(
        self,
        kind: SecurityKind,
        identity: Identity,
        request_id: str,
        trace_id: str | None,
        path: str,
        reason: str,
        count: int = 1,
        first_ts: str | None = None,
    ) -> AuditEvent:
        """A security event standing for ``count`` refusals (>= 1), the first at ``first_ts``
        (``format_ts`` text; None: now, for a single refusal).

        ``kind`` says what refused them: ``rate_limited`` for a limit, ``auth_failed`` for their
        credentials; ``reason`` is the error code answered (e.g. RATE_LIMITED, TOKEN_EXPIRED)."""
        if count < 1:
            raise ValueError("a security event stands for at least one refusal")
        body = self._base(kind, identity, request_id, trace_id)
        body.update(
            client_ip=identity.client_ip, path=path, reason=reason, count=count, first_ts=first_ts or body["ts"]
        )
        return _seal(body)

    def now(self) -> str:
        """The current time as a record's ``ts`` would state it."""
        return format_ts(self._clock())

    def _base(self, kind: str, identity: Identity, request_id: str, trace_id: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "ts": format_ts(self._clock()),
            "event_type": kind,
            "request_id": request_id,
            "trace_id": trace_id,
            "user_id": self.user_id(identity),
            "identity_kind": identity.kind,
        }
        if identity.authenticated and identity.email:
            body["email"] = identity.email
        return body


def _seal(body: dict[str, Any]) -> AuditEvent:
    """Check the body against ``ALLOWED_FIELDS``: a stray key is a bug that could leak PII."""
    allowed = ALLOWED_FIELDS[body["event_type"]]
    extra = body.keys() - allowed - OPTIONAL_FIELDS
    missing = allowed - body.keys()
    if extra or missing:
        raise ValueError(f"{body['event_type']} event: unexpected {sorted(extra)}, missing {sorted(missing)}")
    return AuditEvent(MappingProxyType(body))


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
