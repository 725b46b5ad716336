"""``GET /api/admin/audit``: filtered, paginated reads of the trail plus the chain's status.

Only an authenticated ``admin`` may read: a caller without a verified token gets 401 (with
``WWW-Authenticate``: authenticate, then retry), a verified non-admin 403 (no token of theirs will
do). A refused attempt is itself a security event (``auth_failed``, reason UNAUTHORIZED or
FORBIDDEN), handed to ``refuse``, which charges the caller's address and folds repeats into one
record per window (recording each one let an anonymous client fill the store through this
endpoint), and every successful read is audited (``admin_read``), so reading personal data
always leaves a trace. The ``ip`` filter is turned into the pseudonymous
user id before it is used or logged: the admin_read record must not reintroduce a raw IP.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from bridge.audit.events import ALLOWED_FIELDS, EARLIEST_TS, LATEST_TS, parse_ts
from bridge.audit.store import QueryFilters
from bridge.audit.trail import AuditTrail
from bridge.errors import BadRequest, BridgeError, Forbidden, JSONResponse, Unauthorized, error_response
from bridge.telemetry import request_ids
from bridge.types import Identity

Authenticate = Callable[[Request], Awaitable[Identity]]
Refuse = Callable[[Request, Identity, BridgeError], Awaitable[BridgeError]]
Endpoint = Callable[[Request], Awaitable[Response]]

_TRUE = {"1", "true", "yes"}


# SQLite integers are 64-bit: a larger cursor or offset would raise OverflowError (a 500).
_SQLITE_MAX_INT = 2**63 - 1


def admin_audit_endpoint(
    trail: AuditTrail,
    authenticate: Authenticate,
    refuse: Refuse,
    *,
    max_limit: int = 1000,
    status_max_age_s: float = 60.0,
    admin_role: str = "admin",
) -> Endpoint:
    """The endpoint; ``authenticate`` resolves the caller and raises ``BridgeError`` (401, 429)
    itself; ``refuse`` reports a refused caller and returns the error to answer with."""

    async def endpoint(request: Request) -> Response:
        request_id, trace_id = request_ids(request)
        try:
            identity = await authenticate(request)
            if not identity.authenticated:  # 401 + WWW-Authenticate: sign in, then retry
                denied: BridgeError | None = Unauthorized("authentication required", code="UNAUTHORIZED")
            elif identity.role != admin_role:  # signed in, but no token of this user will do
                denied = Forbidden("the audit trail is readable by admins only")
            else:
                denied = None
            if denied is not None:
                raise await refuse(request, identity, denied)
            filters, limit, offset, shown = _parse(request, trail, max_limit)
        except BridgeError as exc:
            return error_response(exc)
        records = await trail.query(filters, limit, offset)
        fresh = request.query_params.get("verify", "").lower() in _TRUE
        status = await trail.chain_status(0.0 if fresh else status_max_age_s)
        trail.record(trail.events.admin_read(identity, request_id, trace_id, filters=shown, returned=len(records)))
        return JSONResponse(
            {
                "records": [r.row() for r in records],
                "count": len(records),
                "next_cursor": records[-1].id if len(records) == limit else None,
                "chain": status.to_dict(),
            }
        )

    return endpoint


def _parse(request: Request, trail: AuditTrail, max_limit: int) -> tuple[QueryFilters, int, int, dict[str, str]]:
    """(filters, limit, offset, the filters as recorded in admin_read); BadRequest on a bad value."""
    params = request.query_params
    event_type = params.get("event_type") or None
    if event_type is not None and event_type not in ALLOWED_FIELDS:
        raise BadRequest(f"event_type must be one of {', '.join(sorted(ALLOWED_FIELDS))}")
    user_id = params.get("user_id") or None
    if params.get("ip"):
        if user_id is not None:
            raise BadRequest("give user_id or ip, not both")
        user_id = trail.events.user_id(Identity(client_ip=params["ip"].strip()))
    filters = QueryFilters(
        event_type=event_type,
        user_id=user_id,
        since=_ts(params.get("since"), "since"),
        until=_ts(params.get("until"), "until"),
        before_id=_int(params.get("cursor"), "cursor", 1, _SQLITE_MAX_INT),
    )
    limit = _int(params.get("limit"), "limit", 1, max_limit) or 100
    offset = _int(params.get("offset"), "offset", 0, _SQLITE_MAX_INT) or 0
    shown: dict[str, Any] = {
        "event_type": event_type,
        "user_id": user_id,
        "since": filters.since,
        "until": filters.until,
        "cursor": filters.before_id,
        "limit": limit,
        "offset": offset,
    }
    return filters, limit, offset, {k: str(v) for k, v in shown.items() if v is not None}


def _ts(value: str | None, name: str) -> str | None:
    """A ``since``/``until`` bound in stored form; BadRequest for text that is not an instant in range."""
    if not value:
        return None
    try:
        return parse_ts(value)
    except ValueError:
        raise BadRequest(f"{name} must be an ISO 8601 timestamp within {EARLIEST_TS}..{LATEST_TS}") from None


def _int(value: str | None, name: str, low: int, high: int | None) -> int | None:
    if not value:
        return None
    bound = f"{low}..{high}" if high is not None else f">= {low}"
    try:
        number = int(value)
    except ValueError:
        raise BadRequest(f"{name} must be an integer {bound}") from None
    if number < low or (high is not None and number > high):
        raise BadRequest(f"{name} must be an integer {bound}")
    return number
