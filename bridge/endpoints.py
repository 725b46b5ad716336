"""The HTTP handlers. Each turns a request into a response and nothing else; policy lives in the
modules they call (gate, inputs, streaming, upstream)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
from opentelemetry.context import Context
from starlette.requests import Request
from starlette.responses import Response

from bali_zero.rag.v1 import rag_pb2
from bridge.audit.http import request_ids
from bridge.auth import effective_role
from bridge.errors import BridgeError, NotFound, from_grpc_status
from bridge.gate import Admission, Rejected
from bridge.inputs import ChatInput, read_input
from bridge.logs import log_stream_end
from bridge.metrics import BridgeMetrics
from bridge.responses import JSONResponse, error_response
from bridge.resume_store import ResumeStore, StoreUnavailable, StreamNotFound
from bridge.rollout import in_rollout
from bridge.state import BridgeState
from bridge.streaming import (
    ErrorFrameResponse,
    EventStreamResponse,
    FramesTrimmed,
    StreamExpired,
    StreamSession,
    new_stream_id,
    parse_event_id,
    parse_seq,
)
from bridge.telemetry import Telemetry, trace_id_of
from bridge.types import Identity, StreamResult
from bridge.upstream import StreamCall

_ROLES = {"user": rag_pb2.CHAT_ROLE_USER, "assistant": rag_pb2.CHAT_ROLE_ASSISTANT, "system": rag_pb2.CHAT_ROLE_SYSTEM}


def _upstream_fields(chat: ChatInput, identity: Identity, request_id: str) -> dict[str, Any]:
    return {
        "query": chat.query,
        # A verified email wins; an anonymous caller's email is a personalisation hint only.
        "user_email": identity.email or chat.user_email or "",
        "user_role": effective_role(identity, chat.user_role) or "",
        "conversation_history": [rag_pb2.ChatMessage(role=_ROLES[r], content=c) for r, c in chat.history],
        "request_id": request_id,
    }


class Endpoints:
    def __init__(self, state: BridgeState) -> None:
        self.state = state

    # -- streaming -------------------------------------------------------------------------------

    async def chat_stream(self, request: Request) -> Response:
        state = self.state
        if not state.settings.enable_sse_streaming:
            return error_response(
                NotFound("streaming is disabled on this server (ENABLE_SSE_STREAMING=false); "
                         "use POST /api/v2/bali-zero/chat", code="STREAMING_DISABLED")
            )
        resume_from = parse_event_id(
            request.headers.get("last-event-id") or request.query_params.get("last_event_id")
        )
        connection_id = request.headers.get("x-connection-id")
        bare_seq = parse_seq(request.headers.get("last-event-id"))
        if resume_from is None and connection_id and bare_seq is not None:
            resume_from = parse_event_id(f"{connection_id}:{bare_seq}")
        try:
            if resume_from is not None:
                return await self._resume(request, *resume_from)
            admission = await state.gate.admit(request)
        except Rejected as rejected:
            return error_response(rejected.error, rejected.headers)
        except BridgeError as exc:
            return error_response(exc)
        try:
            return await self._open(request, admission)
        except BridgeError as exc:
            return error_response(exc, admission.headers)

    async def _open(self, request: Request, admission: Admission) -> Response:
        state = self.state
        identity = admission.identity
        if not in_rollout(identity.key, state.settings.sse_rollout_percent):
            raise NotFound("streaming is not yet enabled for this user; use POST /api/v2/bali-zero/chat",
                           code="STREAMING_DISABLED")
        chat = await read_input(request, state.limits)
        request_id, _ = request_ids(request)
        try:
            lease = state.caps.acquire(identity.key)
        except BridgeError as exc:
            state.metrics.rate_limited("streams")
            state.audit.record(state.audit.events.rate_limited(identity, request_id, None, path=request.url.path,
                                                               reason=exc.code))
            raise
        telemetry = state.telemetry
        span = telemetry.start_stream_span(
            "chat-stream", _trace_parent(request), {"http.request.method": request.method, "request_id": request_id}
        )
        started = time.monotonic()
        try:
            with telemetry.activate(span):
                message = rag_pb2.StreamChatRequest(**_upstream_fields(chat, identity, request_id))
                call = await self._start_call(message, request_id)
        except BaseException as exc:
            lease.release()
            code = exc.code if isinstance(exc, BridgeError) else "CANCELLED"
            elapsed = round((time.monotonic() - started) * 1000, 3)
            refused = StreamResult("", request_id, "error", 0, elapsed, None, code, trace_id=trace_id_of(span))
            telemetry.end_stream_span(span, refused)
            if isinstance(exc, BridgeError):  # the RAG service refused or was unreachable: still audited
                state.audit.record(state.audit.events.stream_ended(identity, chat.query, refused))
            raise

        audit = state.audit
        trace_id = trace_id_of(span)
        audit.record(audit.events.stream("stream_started", identity, request_id, trace_id, chat.query))

        def ended(session: StreamSession, result: StreamResult) -> None:
            lease.release()
            log_stream_end(result)
            audit.record(audit.events.stream_ended(identity, chat.query, result))

        def settled(result: StreamResult) -> None:
            """The final frame was written, or no reader is left to write it to.

            Only now does the resume window start: counted from the upstream's end instead, a
            reader that lagged more than RESUME_GRACE_S behind a finished answer and then lost its
            connection found the stream forgotten (STREAM_EXPIRED; the 7-minute soak found one).
            """
            telemetry.end_stream_span(span, result)
            grace = state.settings.resume_grace_s
            if grace > 0:
                asyncio.get_running_loop().call_later(grace, state.registry.discard, session)
            else:
                state.registry.discard(session)

        stream_id = new_stream_id()
        store = state.registry.resume_store(state.settings, state.policy)
        session = StreamSession(
            stream_id=stream_id,
            request_id=request_id,
            owner=identity.key,
            policy=state.policy,
            observer=state.observer,
            on_end=ended,
            on_first_token=lambda ms: telemetry.record_first_token(span, ms),
            on_settled=settled,
            trace_id=trace_id,
            sink=None if store is None else store.mirror(stream_id, request_id, identity.key),
        )
        state.registry.add(session)
        def reopen() -> StreamCall:
            with telemetry.activate(span):
                return state.rag.stream_chat(message, timeout=state.settings.upstream_timeout_s,
                                             metadata=(("x-request-id", request_id),))

        session.start(call, retry=reopen)
        return _StreamResponse(EventStreamResponse(session, 0, headers=admission.headers), state.metrics)

    async def _start_call(
        self, message: rag_pb2.StreamChatRequest, request_id: str
    ) -> StreamCall:
        """Open the gRPC stream; fail as an HTTP error while no frame has been sent.

        The bridge waits (briefly) for the RAG service to accept the call, so "unreachable" and
        "bad request" become a 503 or 400 instead of a stream that opens and errors at once.
        An UNAVAILABLE answer is retried once: with several replicas, round robin picks another.
        """
        settings = self.state.settings
        accept_wait = min(settings.upstream_connect_timeout_s, settings.heartbeat_interval_s)
        for attempt in (1, 2):
            call = self.state.rag.stream_chat(
                message, timeout=settings.upstream_timeout_s, metadata=(("x-request-id", request_id),)
            )
            try:
                async with asyncio.timeout(accept_wait):
                    await call.initial_metadata()
            except TimeoutError:
                return call  # accepted lazily: heartbeats cover the wait from here on
            except asyncio.CancelledError:
                call.cancel()
                raise
            if not call.done():
                return call
            code = await call.code()
            if code == grpc.StatusCode.OK:
                return call
            if code == grpc.StatusCode.UNAVAILABLE and attempt == 1:
                continue
            raise from_grpc_status(code, await call.details())
        raise AssertionError("unreachable")  # pragma: no cover

    async def _resume(self, request: Request, stream_id: str, after_seq: int) -> Response:
        state = self.state
        identity = await state.gate.identify(request)
        session = state.registry.get(stream_id)
        store = state.registry.resume_store(state.settings, state.policy)
        if session is not None:
            if session.owner != identity.key:
                raise NotFound("no such stream", code="STREAM_NOT_FOUND")
            try:
                session.check_resumable(after_seq)
            except FramesTrimmed as exc:
                if store is None:
                    return _expired_stream(stream_id, after_seq, exc)
                session = None  # dropped here once mirrored: the shared store still holds them
            except StreamExpired as exc:
                return _expired_stream(stream_id, after_seq, exc)
        if session is None:
            if store is None:
                return _expired_stream(stream_id, after_seq)
            return await self._resume_remote(store, identity.key, stream_id, after_seq)
        if session.finished and session.sent_seq >= session.last_seq == after_seq:
            return Response(status_code=204)  # the client has everything; 204 stops EventSource
        state.observer.reconnected()
        return _StreamResponse(EventStreamResponse(session, after_seq), state.metrics)

    async def _resume_remote(
        self, store: ResumeStore, identity_key: str, stream_id: str, after_seq: int
    ) -> Response:
        """A reconnect for a stream another instance owns (or dropped here), served from the store."""
        try:
            remote = await store.open_remote(stream_id, identity_key, after_seq)
        except StreamNotFound:
            raise NotFound("no such stream", code="STREAM_NOT_FOUND") from None
        except (StreamExpired, StoreUnavailable) as exc:
            # An SSE answer either way: STREAM_EXPIRED stops the client, RESUME_UNAVAILABLE is
            # retryable, so it reconnects (perhaps to the owner, which can still serve it).
            return _expired_stream(stream_id, after_seq, exc)
        if remote is None:
            return Response(status_code=204)  # the client has everything; 204 stops EventSource
        self.state.observer.reconnected()
        return _StreamResponse(EventStreamResponse(remote, after_seq), self.state.metrics)

    async def cancel_stream(self, request: Request) -> Response:
        state = self.state
        identity = await state.gate.identify(request)
        stream_id = request.path_params["stream_id"]
        session = state.registry.get(stream_id)
        if session is not None:
            if session.owner != identity.key:
                return error_response(NotFound("no such stream", code="STREAM_NOT_FOUND"))
            session.stop()
            return Response(status_code=204)
        store = state.registry.resume_store(state.settings, state.policy)
        try:
            if store is not None and await store.request_cancel(stream_id, identity.key):
                return Response(status_code=204)  # published to the owner's cancel channel
        except StoreUnavailable as exc:
            return error_response(exc)
        return error_response(NotFound("no such stream", code="STREAM_NOT_FOUND"))

    # -- non-streaming ---------------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        state = self.state
        try:
            admission = await state.gate.admit(request)
        except Rejected as rejected:
            return error_response(rejected.error, rejected.headers)
        identity = admission.identity
        request_id, trace_id = request_ids(request)
        started = time.monotonic()
        query: str | None = None
        try:
            chat = await read_input(request, state.limits)
            query = chat.query
            message = rag_pb2.ChatRequest(**_upstream_fields(chat, identity, request_id))
            try:
                reply = await state.rag.chat(
                    message, timeout=state.settings.upstream_timeout_s, metadata=(("x-request-id", request_id),)
                )
            except grpc.aio.AioRpcError as exc:
                raise from_grpc_status(exc.code(), exc.details()) from None
        except BridgeError as exc:
            if query is not None:
                state.audit.record(state.audit.events.chat(
                    identity, request_id, trace_id, query, outcome="error", error_code=exc.code,
                    duration_ms=round((time.monotonic() - started) * 1000, 3)))
            return error_response(exc, admission.headers)
        duration_ms = round((time.monotonic() - started) * 1000, 3)
        state.audit.record(state.audit.events.chat(
            identity, request_id, trace_id, chat.query, outcome="completed", duration_ms=duration_ms,
            tokens=reply.completion.token_count))
        body = {
            "answer": reply.answer,
            "sources": [{"title": s.title, "uri": s.uri, "score": s.score} for s in reply.metadata.sources],
            "model": reply.metadata.model,
            "request_id": request_id,
            "finish_reason": "length" if reply.completion.finish_reason == rag_pb2.FINISH_REASON_LENGTH else "stop",
            "metrics": {"tokens": reply.completion.token_count, "duration_ms": duration_ms},
        }
        return JSONResponse(body, headers=admission.headers)

    # -- observability ---------------------------------------------------------------------------

    async def metrics(self, request: Request) -> Response:
        body, content_type = self.state.metrics.render()
        return Response(body, headers={"content-type": content_type})

    async def stream_stats(self, request: Request) -> Response:
        snapshot = self.state.stats.snapshot()
        snapshot["sessions_held"] = len(self.state.registry)
        snapshot["open_connections_by_cap"] = self.state.caps.open_total
        return JSONResponse(snapshot)

    # -- health ----------------------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        upstream = self.state.upstream
        if self.state.gate.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if upstream is None or not await upstream.serving():
            return JSONResponse({"status": "unavailable", "upstream": "not serving"}, status_code=503)
        return JSONResponse({"status": "ready", "upstream": "serving"})


def _expired_stream(stream_id: str, after_seq: int, error: BridgeError | None = None) -> Response:
    """A late reconnect: one ``error`` frame, not retryable, so the client stops reconnecting."""
    error = error or StreamExpired("the stream is no longer available; ask again", retryable=False)
    return ErrorFrameResponse(f"{stream_id}:{after_seq}", error)


class _StreamResponse(Response):
    """Adapts an EventStreamResponse to Starlette's Response interface and counts the connection."""

    def __init__(self, inner: EventStreamResponse, metrics: BridgeMetrics) -> None:
        self.inner = inner
        self.metrics = metrics
        self.status_code = 200
        self.background = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.metrics.connection_opened()
        try:
            await self.inner(scope, receive, send)
        finally:
            self.metrics.connection_closed()


def _trace_parent(request: Request) -> Context:
    """The caller's trace: the ``traceparent`` header, or the query parameter EventSource must use."""
    carrier = {
        name: value
        for name in ("traceparent", "tracestate")
        if (value := request.headers.get(name) or request.query_params.get(name))
    }
    return Telemetry.extract_context(carrier)
