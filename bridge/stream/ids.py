"""Stream ids and SSE event ids (``"<stream_id>:<seq>"``): issuing and parsing them."""

from __future__ import annotations

import re
import secrets

_EVENT_ID = re.compile(r"([A-Za-z0-9_-]{1,64}):([0-9]{1,18})", re.ASCII)
_SEQ = re.compile(r"[0-9]{1,18}", re.ASCII)


def new_stream_id() -> str:
    return secrets.token_urlsafe(12)


def parse_event_id(value: str | None) -> tuple[str, int] | None:
    """``"<stream_id>:<seq>"`` → (stream_id, seq); anything else → None.

    Only the alphabet the bridge itself issues is accepted: an id is echoed back in an ``id:``
    field, where CR, LF or NUL would corrupt the stream, and ``str.isdigit`` accepts "²".
    """
    match = _EVENT_ID.fullmatch(value or "")
    return (match.group(1), int(match.group(2))) if match else None


def parse_seq(value: str | None) -> int | None:
    """A bare ``Last-Event-ID`` sequence number (used with ``x-connection-id``)."""
    return int(value) if value and _SEQ.fullmatch(value) else None


def resume_point(last_event_id: str | None, query_id: str | None, connection_id: str | None) -> tuple[str, int] | None:
    """Where a reconnect resumes: the ``Last-Event-ID`` header (or the ``last_event_id`` query
    parameter EventSource-less clients use), or a bare seq with ``x-connection-id``."""
    resume_from = parse_event_id(last_event_id or query_id)
    bare_seq = parse_seq(last_event_id)
    if resume_from is None and connection_id and bare_seq is not None:
        resume_from = parse_event_id(f"{connection_id}:{bare_seq}")
    return resume_from
