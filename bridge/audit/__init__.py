"""GDPR audit trail: keyed-hashed queries, PII minimisation, retention and a tamper-evident chain.

Wiring: ``trail = AuditTrail.from_settings(settings)``; ``await trail.start()`` at start-up,
``trail.record(trail.events.stream_ended(identity, query, result))`` on the request path,
``await trail.aclose()`` at shutdown.
"""

from bridge.audit.chain import VerifyResult, verify
from bridge.audit.events import AuditEvent, EventFactory
from bridge.audit.store import QueryFilters, SQLiteStore
from bridge.audit.trail import AuditTrail

__all__ = [
    "AuditEvent",
    "AuditTrail",
    "EventFactory",
    "QueryFilters",
    "SQLiteStore",
    "VerifyResult",
    "verify",
]
