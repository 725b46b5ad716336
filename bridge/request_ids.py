"""The ids a request is known by: its request id (echoed, logged, audited) and its trace id."""

from __future__ import annotations

import re
import uuid

from starlette.requests import Request

# ``fullmatch``, never ``match`` with ``$`` (which accepts a trailing "\n" too).
_REQUEST_ID = re.compile(r"[A-Za-z0-9._\-]{1,64}")
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")


def request_ids(request: Request) -> tuple[str, str | None]:
    """(request id, trace id): from ``request.state`` if middleware set them, else from headers.

    A client's ``x-request-id`` is kept only in a safe alphabet and length (it is echoed in a
    header and written to logs and the audit trail); anything else gets a fresh id.
    """
    request_id = getattr(request.state, "request_id", None)
    if not isinstance(request_id, str):
        given = request.headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
    trace_id = getattr(request.state, "trace_id", None)
    if not isinstance(trace_id, str):
        match = _TRACEPARENT.fullmatch(request.headers.get("traceparent", "").strip())
        trace_id = match.group(1) if match else None
    return request_id, trace_id
