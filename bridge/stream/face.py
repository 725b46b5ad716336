"""The wire format a stream is opened with: its frames, its heartbeat and its HTTP errors.

One way to open a stream (bridge/stream/opener.py) serves every face: the session, its pump,
back-pressure, heartbeats, cancellation and drain are the same; only the bytes differ. The native
face sends the bridge's own frames (bridge/stream/frames.py); the OpenAI-compatible face sends
``chat.completion.chunk`` events (bridge/openai_compat.py). Each token is encoded once, in the
face's format, when its message arrives: nothing re-parses another face's frames.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Protocol

from starlette.responses import Response

from bridge.errors import BridgeError, error_response
from bridge.stream.frames import FrameEncoder, StreamEncoder, heartbeat_frame


class StreamFace(Protocol):
    resumable: ClassVar[bool]
    """Whether its streams may be resumed with ``Last-Event-ID`` (the OpenAI face's may not)."""

    def encoder(self, stream_id: str, request_id: str) -> StreamEncoder:
        """The encoder of one new stream."""
        ...

    def heartbeat(self, stream_id: str, sent_seq: int) -> bytes:
        """What fills a silence of HEARTBEAT_INTERVAL_S; ``sent_seq``: the last frame written."""
        ...

    def error_response(self, error: BridgeError, headers: Mapping[str, str]) -> Response:
        """The HTTP answer to a refusal before any frame was sent (the RAG service refused the call)."""
        ...


class NativeFace:
    """The bridge's own frames: ``metadata``, ``token``, ``done``/``error``, ``event: heartbeat``."""

    resumable: ClassVar[bool] = True

    def encoder(self, stream_id: str, request_id: str) -> StreamEncoder:
        return FrameEncoder(stream_id, request_id)

    def heartbeat(self, stream_id: str, sent_seq: int) -> bytes:
        return heartbeat_frame(f"{stream_id}:{sent_seq}")

    def error_response(self, error: BridgeError, headers: Mapping[str, str]) -> Response:
        return error_response(error, headers)


NATIVE = NativeFace()
