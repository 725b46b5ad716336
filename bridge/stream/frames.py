"""Upstream messages and stream ends as SSE frames, with this stream's event ids.

Every byte a native stream sends is made here (through the pure encoders of ``bridge.sse``), so
the shape of a ``metadata``, ``token``, ``done`` or ``error`` frame has one home. A session takes
any ``StreamEncoder``: the OpenAI-compatible face's chunks are made in bridge/openai_compat.py.

The ids are issued and parsed here too: a stream id, and an event id ``"<stream_id>:<seq>"`` per
frame, which is what a reconnect's ``Last-Event-ID`` names (``resume_point``).
"""

from __future__ import annotations

import math
import re
import secrets
import sys
from typing import Any, ClassVar, Protocol

from bali_zero.rag.v1 import rag_pb2
from bridge import sse
from bridge.errors import BridgeError
from bridge.types import StreamResult

FINISH_REASONS = {
    rag_pb2.FINISH_REASON_STOP: "stop",
    rag_pb2.FINISH_REASON_LENGTH: "length",
    rag_pb2.FINISH_REASON_UNSPECIFIED: "stop",
}


# Sources a client is shown at most, best first (the RAG service lists them best first).
MAX_SOURCES = 100


def sources(meta: rag_pb2.Metadata) -> list[dict[str, Any]]:
    """The retrieved documents as the client reads them (the metadata frame, the unary answer):
    the first ``MAX_SOURCES``.

    The cap bounds what one upstream message can cost. An empty ``Source`` is 2 bytes of
    protobuf but a dict and a JSON object here, so a metadata message packed with them up to
    gRPC's receive limit would, without the cap, build a frame far larger than the message on the
    event loop: every other stream and request would stall meanwhile, and the process grow by many
    times the message's size, per such answer.

    A score that is not a finite number, which a ``double`` can carry and JSON cannot, is sent as
    a number that sorts the same way: NaN as 0, an infinity as the largest finite double of its
    sign. ``json.dumps`` writes them as ``NaN``/``Infinity``, which ``JSON.parse`` refuses, so a
    RAG service scoring one document NaN would fail every answer in the browser (``bad_frame``).
    """
    return [{"title": s.title, "uri": s.uri, "score": _json_number(s.score)} for s in meta.sources[:MAX_SOURCES]]


def _json_number(value: float) -> float:
    if math.isfinite(value):
        return value
    return 0.0 if math.isnan(value) else math.copysign(sys.float_info.max, value)


def finish_reason(completion: rag_pb2.Completion) -> str:
    return FINISH_REASONS.get(completion.finish_reason, "stop")


def error_frame(event_id: str, error: BridgeError) -> bytes:
    """An ``error`` frame, preceded by a ``retry:`` hint when the error carries one."""
    prefix = sse.retry_field(int(error.retry_after_s * 1000)) if error.retry_after_s else b""
    return prefix + sse.json_frame(event_id, error.frame())


def heartbeat_frame(event_id: str) -> bytes:
    """A ``heartbeat`` event carrying the id of the last frame sent (so it never moves the id on)."""
    return sse.frame(event_id, '{"type":"heartbeat"}', event="heartbeat")


class StreamEncoder(Protocol):
    """The bytes of one stream's frames, in the format of the face that opened it.

    Each message is encoded once, in the turn it arrives; ``seq`` is the frame's position in the
    stream (the native face writes it into the event id, a face without resume ignores it). The
    ``done`` or ``error`` frame is the last one the stream sends.
    """

    resumable: ClassVar[bool]
    """Whether a reader may continue the stream with ``Last-Event-ID`` (and its frames are mirrored)."""

    def token(self, seq: int, index: int, token: rag_pb2.Token) -> bytes: ...

    def metadata(self, seq: int, meta: rag_pb2.Metadata) -> bytes: ...

    def done(self, seq: int, result: StreamResult) -> bytes: ...

    def error(self, seq: int, error: BridgeError) -> bytes: ...


class FrameEncoder:
    """The frames of one stream; ``seq`` is the number after the ``<stream_id>:`` of the event id."""

    __slots__ = ("_prefix", "request_id", "stream_id")
    resumable: ClassVar[bool] = True

    def __init__(self, stream_id: str, request_id: str) -> None:
        self.stream_id = stream_id
        self.request_id = request_id
        self._prefix = f"{stream_id}:"

    def event_id(self, seq: int) -> str:
        return f"{self._prefix}{seq}"

    def token(self, seq: int, index: int, token: rag_pb2.Token) -> bytes:
        """A ``token`` frame; ``index`` is the token's position among this stream's tokens.

        Counted by the bridge, not copied from ``Token.index``: proto3 cannot tell an index of 0
        from one never set, and the browser client drops a token whose index it has already seen
        (its dedupe after a resume), so copied, a RAG service that leaves the field unset would show
        only the first token of every answer, and one that skips or repeats an index lose text silently.
        """
        return sse.token_frame(f"{self._prefix}{seq}", index, token.text)

    def metadata(self, seq: int, meta: rag_pb2.Metadata) -> bytes:
        payload: dict[str, Any] = {
            "type": "metadata",
            "stream_id": self.stream_id,
            "request_id": self.request_id,
            "model": meta.model,
            "sources": sources(meta),
        }
        return sse.json_frame(self.event_id(seq), payload)

    def done(self, seq: int, result: StreamResult) -> bytes:
        payload = {
            "type": "done",
            "finish_reason": result.finish_reason,
            "metrics": {
                "first_token_ms": result.first_token_ms,
                "tokens": result.tokens,
                "duration_ms": result.duration_ms,
            },
        }
        return sse.json_frame(self.event_id(seq), payload)

    def error(self, seq: int, error: BridgeError) -> bytes:
        return error_frame(self.event_id(seq), error)


# ------------------------------------------------------------------------ stream ids and event ids
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
