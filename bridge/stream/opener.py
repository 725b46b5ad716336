"""The one way to open a stream: identity, validated input and request id → a started session.

Opening is ordered so that a refusal costs nothing and leaks nothing: the stream slot (caps)
first, then the trace span, the upstream call, and once its request is out the session that
pumps it, known to nobody but the registry yet, and its response. The response settles the open
(``OpenStream``): its HTTP status waits for the RAG service's first message, or a refusal
(answered as an HTTP error while no frame has been sent), or the accept wait; only then is the
session announced to its hooks, observers and the resume store's mirror. A refused or interrupted
open gives the slot back, ends the span and leaves the registry; an opened stream gives them back
through its hooks when it ends.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from opentelemetry.context import Context
from opentelemetry.trace import Span

from bridge.errors import BridgeError
from bridge.inputs import ChatInput
from bridge.logs import log_stream_end
from bridge.rag_request import stream_chat_request
from bridge.resume.keys import owner_tag
from bridge.resume.mirror import FrameMirror
from bridge.stream.ids import new_stream_id
from bridge.stream.session import StreamSession
from bridge.streamcap import Lease
from bridge.telemetry import trace_id_of
from bridge.types import Identity, StreamResult
from bridge.upstream import ChatStream

if TYPE_CHECKING:
    from bridge.state import BridgeState

R = TypeVar("R")


class StreamOpener:
    """Opens streams for the endpoints; everything it needs comes from the app's state."""

    def __init__(self, state: BridgeState) -> None:
        self.state = state

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
    ) -> R:
        """The response of a started stream (``respond(session, pending)``), or raises the
        ``BridgeError`` to answer instead (429 and the like).

        The response does not wait for the RAG service here: it settles the open itself
        (``OpenStream``), so the pump can write the first frames without waking this task.
        """
        state = self.state
        try:
            lease = await state.caps.take(identity.key)
        except BridgeError as exc:
            state.metrics.rate_limited("streams")
            state.audit.record(state.audit.events.rate_limited(identity, request_id, None, path=path, reason=exc.code))
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
            # before the call instead, it delayed the request: 20 paired rounds, ratio 0.86.
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
        session = StreamSession(
            stream_id=new_stream_id(),
            request_id=request_id,
            owner=identity.key,
            policy=state.policy,
            observer=state.observer,
            trace_id=trace_id_of(span),
            started=started,
        )
        session.start(call, announce=False)
        # Known from now on (a DELETE right after the first frame must find it); forgotten
        # again if the RAG service refuses the call.
        state.registry.add(session)
        return respond(session, OpenStream(state, session, lease, span, identity, chat.query))


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

    async def answered(self) -> BridgeError | None:
        """Wait until the stream ended, ``release`` or the accept wait; the refusal, if refused.

        The accept wait bounds how long the status line may wait for the RAG service; once it
        passed, the status goes out and heartbeats cover the rest of the wait.
        """
        settings = self.state.settings
        accept_wait_s = min(settings.upstream_connect_timeout_s, settings.heartbeat_interval_s)
        return await self.session.answered(accept_wait_s, on_frame=False)

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
            if store is None
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
        connection found the stream forgotten (STREAM_EXPIRED; the 7-minute soak found one).
        """
        telemetry = self.state.telemetry
        if self.span.is_recording() and self.session.upstream_open:
            # The final frame can leave before the gRPC status arrives: end the span after it.
            telemetry.end_stream_span_after(self.session.wait_closed(), self.span, result)
        else:
            telemetry.end_stream_span(self.span, result)
        self.state.registry.discard_after(self.session, self.state.settings.resume_grace_s)
