"""The one way to open a stream: identity, validated input and request id → a started session.

Opening is ordered so that a refusal costs nothing and leaks nothing: the stream slot (caps)
first, then the trace span, the upstream call, and once its request is out the session that
pumps it, known to nobody but the registry yet, and its response. With a resume store, the
stream's meta record is stored before the response exists (``OpenStream.claim``), so no client
learns a stream id another instance could not yet find. The response settles the open
(``OpenStream``): its HTTP status waits for the RAG service's first message, or a refusal
(answered as an HTTP error while no frame has been sent), or the accept wait; only then is the
session announced to its hooks, observers and the resume store's mirror. A refused or interrupted
open gives the slot back, ends the span, leaves the registry and forgets the meta record; an
opened stream gives them back through its hooks when it ends.

Every face of the API opens its streams here (``face``, bridge/stream/face.py): the native event
stream and the OpenAI-compatible one get the same caps, span, audit, session and drain, and differ
only in the bytes of their frames. A face without resume gets no grace window and no mirror: its
client cannot come back with ``Last-Event-ID``, so a disconnect cancels upstream at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from opentelemetry.context import Context
from opentelemetry.trace import Span

from bridge.errors import BridgeError
from bridge.inputs import ChatInput
from bridge.logs import log_stream_end
from bridge.resume.keys import owner_tag
from bridge.resume.mirror import FrameMirror
from bridge.stream.face import NATIVE, StreamFace
from bridge.stream.frames import new_stream_id
from bridge.stream.session import StreamSession
from bridge.streamcap import Lease
from bridge.telemetry import trace_id_of
from bridge.types import Identity, StreamResult
from bridge.upstream import ChatStream, stream_chat_request

if TYPE_CHECKING:
    from bridge.state import BridgeState

R = TypeVar("R")


class StreamOpener:
    """Opens streams for the endpoints; everything it needs comes from the app's state."""

    def __init__(self, state: BridgeState) -> None:
        self.state = state
        # A face without resume: no grace window, so a disconnect cancels upstream at once.
        self._no_resume_policy = dataclasses.replace(state.policy, resume_grace_s=0)

    async def open(
        self,
        identity: Identity,
        chat: ChatInput,
        request_id: str,
        *,
        trace_parent: Context,
        method: str,
        path: str,
        respond: Callable[[StreamSession, OpenStream], R],
        face: StreamFace = NATIVE,
    ) -> R:
        """The response of a started stream (``respond(session, pending)``), or raises the
        ``BridgeError`` to answer instead (429 and the like).

        The RAG service is not waited for here: the response settles the open (``OpenStream``).
        """
        state = self.state
        try:
            lease = await state.caps.take(identity.key)
        except BridgeError as exc:
            state.metrics.rate_limited("streams")
            state.refusals.refused(
                "rate_limited", identity, request_id=request_id, trace_id=None, path=path, reason=exc.code
            )
            raise
        telemetry = state.telemetry
        span = telemetry.start_stream_span(
            "chat-stream", trace_parent, {"http.request.method": method, "request_id": request_id}
        )
        started = time.monotonic()
        call: ChatStream | None = None
        try:
            with telemetry.activate(span):
                call = state.rag.chat_stream(stream_chat_request(chat, identity, request_id))
            # grpc.aio sends the request from a task of its own, queued by now: let it go out
            # first, then build the session while the RAG service works on the answer. Built
            # before the call, the session would delay the request by its own construction time.
            await asyncio.sleep(0)
        except BaseException:
            if call is not None:  # no pump reads it yet: nothing awaits the call, cancel it directly
                call.cancel()
            lease.release()
            elapsed = round((time.monotonic() - started) * 1000, 3)
            interrupted = StreamResult(
                "", request_id, "error", 0, elapsed, None, "CANCELLED", trace_id=trace_id_of(span)
            )
            telemetry.end_stream_span(span, interrupted)
            raise
        stream_id = new_stream_id()
        session = StreamSession(
            stream_id=stream_id,
            request_id=request_id,
            owner=identity.key,
            policy=state.policy if face.resumable else self._no_resume_policy,
            observer=state.observer,
            trace_id=trace_id_of(span),
            started=started,
            encoder=face.encoder(stream_id, request_id),
        )
        session.start(call)
        # Known from now on (a DELETE right after the first frame must find it); forgotten
        # again if the RAG service refuses the call.
        state.registry.add(session)
        opening = OpenStream(state, session, lease, span, identity, chat.query)
        await opening.claim()  # while the RAG service works on its first message
        return respond(session, opening)


class OpenStream:
    """What the bridge does around one stream it opened, from its gRPC call to its settling.

    First its response (bridge/stream/response.py) settles the open exactly once: ``accepted``
    when the upstream answered (or the accept wait passed), ``refused`` for a gRPC status before
    any frame, ``interrupted`` if the response never got that far (server shutdown). Until then
    the stream is known to the registry only, so a refused call leaves no trace but the refusal.
    Once accepted it is the session's hooks: first token, end and settling.
    """

    __slots__ = ("identity", "lease", "query", "session", "span", "state")

    def __init__(
        self, state: BridgeState, session: StreamSession, lease: Lease, span: Span, identity: Identity, query: str
    ) -> None:
        self.state = state
        self.session = session
        self.lease = lease
        self.span = span
        self.identity = identity
        self.query = query

    @property
    def accept_wait_s(self) -> float:
        """How long the status line may wait for the RAG service; then it goes out, and heartbeats
        cover the rest of the wait."""
        settings = self.state.settings
        return min(settings.upstream_connect_timeout_s, settings.heartbeat_interval_s)

    async def claim(self) -> None:
        """With a resume store: store the stream's meta record before the response can tell anyone
        the stream id (``ResumeStore.claim``). Awaited while the RAG service works on the first
        message, so it costs the first byte only a Redis round trip longer than that work.

        Skipped while the store is known to be down, where each attempt would hold the status line
        for a whole Redis timeout; the stream then runs under single-instance rules until its mirror
        reaches Redis.
        """
        store = self.state.resume_store
        session = self.session
        if store is None or store.down or not session.resumable:  # a face without resume: nothing to claim
            return
        try:
            await store.claim(session.stream_id, owner_tag(self.identity.key), session.request_id, self.accept_wait_s)
        except BaseException:  # the request task was cancelled (server shutdown, client gone)
            self.interrupted()
            raise

    def park(self, handover: Callable[[], Awaitable[None]] | None) -> None:
        self.session.park(handover)

    async def answered(self) -> BridgeError | None:
        """Wait until ``release``, the end of the stream or the accept wait; the refusal, if refused.

        Frames that arrived during ``claim`` end the wait at once: the pump had no writer to hand
        them to, so the response writes them now instead of at the next message.
        """
        session = self.session
        if session.last_seq > 0:  # no handover was parked yet to write them: the writer does
            return None  # a refusal is a status before any frame, so there is none
        return await session.answered(self.accept_wait_s)

    def release(self) -> None:
        self.session.release_answer()

    @property
    def token_sent(self) -> bool:
        return self.session.token_sent

    def accepted(self) -> None:
        state, session, identity = self.state, self.session, self.identity
        audit = state.audit
        audit.record(audit.events.stream("stream_started", identity, session.request_id, session.trace_id, self.query))
        store = state.resume_store
        sink = (
            None
            if store is None or not session.resumable
            else FrameMirror(store, session.stream_id, session.request_id, owner_tag(identity.key))
        )
        session.announce(self, sink)

    def refused(self, error: BridgeError) -> None:
        """The RAG service refused or was unreachable: answered over HTTP, and still audited."""
        refused = self._close(error.code)
        self.state.audit.record(self.state.audit.events.stream_ended(self.identity, self.query, refused))

    def interrupted(self) -> None:
        self.session.abort()
        self._close("CANCELLED")

    def _close(self, code: str) -> StreamResult:
        state, session = self.state, self.session
        state.registry.discard(session)
        if state.resume_store is not None and session.resumable:  # its id never reached a client: nothing may resume it
            state.resume_store.spawn(state.resume_store.unclaim(session.stream_id))
        self.lease.release()
        elapsed = round((time.monotonic() - session.clock.started) * 1000, 3)
        result = StreamResult("", session.request_id, "error", 0, elapsed, None, code, trace_id=session.trace_id)
        state.telemetry.end_stream_span(self.span, result)
        return result

    # -- the hooks of the accepted stream (StreamHooks) ---------------------------------------

    def first_token(self, ms: float) -> None:
        self.state.telemetry.record_first_token(self.span, ms)

    def ended(self, result: StreamResult) -> None:
        self.lease.release()
        log_stream_end(result)
        audit = self.state.audit
        audit.record(audit.events.stream_ended(self.identity, self.query, result))

    def settled(self, result: StreamResult) -> None:
        """The final frame was written, or no reader is left to write it to.

        Only now does the resume window start: counted from the upstream's end instead, a
        reader that lagged more than RESUME_GRACE_S behind a finished answer and then lost its
        connection would find the stream forgotten (STREAM_EXPIRED for a completed answer).
        """
        telemetry = self.state.telemetry
        if self.span.is_recording() and self.session.upstream_open:
            # The final frame can leave before the gRPC status arrives: end the span after it.
            telemetry.end_stream_span_after(self.session.wait_closed(), self.span, result)
        else:
            telemetry.end_stream_span(self.span, result)
        self.state.registry.discard_after(self.session, self.state.settings.resume_grace_s)
