"""Upstream messages and stream ends as SSE frames, with this stream's event ids.

Every byte a stream sends is made here (through the pure encoders of ``bridge.sse``), so the
shape of a ``metadata``, ``token``, ``done`` or ``error`` frame has one home.
"""

from __future__ import annotations

from typing import Any

from bali_zero.rag.v1 import rag_pb2
from bridge import sse
from bridge.errors import BridgeError
from bridge.types import StreamResult

FINISH_REASONS = {
    rag_pb2.FINISH_REASON_STOP: "stop",
    rag_pb2.FINISH_REASON_LENGTH: "length",
    rag_pb2.FINISH_REASON_UNSPECIFIED: "stop",
}


def finish_reason(completion: rag_pb2.Completion) -> str:
    return FINISH_REASONS.get(completion.finish_reason, "stop")


def error_frame(event_id: str, error: BridgeError) -> bytes:
    """An ``error`` frame, preceded by a ``retry:`` hint when the error carries one."""
    prefix = sse.retry_field(int(error.retry_after_s * 1000)) if error.retry_after_s else b""
    return prefix + sse.json_frame(event_id, error.frame())


def heartbeat_frame(event_id: str) -> bytes:
    """A ``heartbeat`` event carrying the id of the last frame sent (so it never moves the id on)."""
    return sse.frame(event_id, '{"type":"heartbeat"}', event="heartbeat")


class FrameEncoder:
    """The frames of one stream; ``seq`` is the number after the ``<stream_id>:`` of the event id."""

    __slots__ = ("_prefix", "request_id", "stream_id")

    def __init__(self, stream_id: str, request_id: str) -> None:
        self.stream_id = stream_id
        self.request_id = request_id
        self._prefix = f"{stream_id}:"

    def event_id(self, seq: int) -> str:
        return f"{self._prefix}{seq}"

    def token(self, seq: int, token: rag_pb2.Token) -> bytes:
        return sse.token_frame(f"{self._prefix}{seq}", token.index, token.text)

    def metadata(self, seq: int, meta: rag_pb2.Metadata) -> bytes:
        payload: dict[str, Any] = {
            "type": "metadata",
            "stream_id": self.stream_id,
            "request_id": self.request_id,
            "model": meta.model,
            "sources": [{"title": s.title, "uri": s.uri, "score": s.score} for s in meta.sources],
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
