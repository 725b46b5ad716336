"""The HTTP handlers. Each parses a request, delegates, and turns the outcome into a response;
policy lives in the modules they call (gate, inputs, stream.opener, stream.session, resume)."""

from __future__ import annotations

import time
from typing import Any

from opentelemetry.context import Context
from starlette.requests import Request
from starlette.responses import Response

from bali_zero.rag.v1 import rag_pb2
from bridge import openai_compat
from bridge.doctor.stream import DiagnosticStream, parse_idle
from bridge.errors import BridgeError, JSONResponse, NotFound, Rejected, StreamExpired, error_response
from bridge.gate import Admission, in_rollout
from bridge.inputs import ChatInput, read_input, read_json_object
from bridge.resume.client import ResumeStore
from bridge.resume.remote import NothingLeft, open_remote
from bridge.state import BridgeState
from bridge.stats import merge_snapshots
from bridge.stream.face import NATIVE, StreamFace
from bridge.stream.frames import resume_point, sources
from bridge.stream.opener import StreamOpener
from bridge.stream.replay import Resume
from bridge.stream.response import ErrorFrameResponse, EventStreamResponse
from bridge.telemetry import Telemetry, request_ids
from bridge.types import Identity
from bridge.upstream import chat_request
from bridge.workers.peers import gather as gather_peers


class Endpoints:
    def __init__(self, state: BridgeState) -> None:
        self.state = state
        self.opener = StreamOpener(state)

    # -- streaming -------------------------------------------------------------------------------

    async def chat_stream(self, request: Request) -> Response:
        state = self.state
        if not state.settings.enable_sse_streaming:
            return error_response(
                NotFound(
                    "streaming is disabled on this server (ENABLE_SSE_STREAMING=false); "
                    "use POST /api/v2/bali-zero/chat",
                    code="STREAMING_DISABLED",
                )
            )
        resume_from = resume_point(
            request.headers.get("last-event-id"),
            request.query_params.get("last_event_id"),
            request.headers.get("x-connection-id"),
        )
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
        self._check_rollout(admission.identity, "use POST /api/v2/bali-zero/chat")
        chat = await read_input(request, self.state.limits)
        return await self._stream(request, admission, chat, NATIVE)

    def _check_rollout(self, identity: Identity, instead: str) -> None:
        """404 STREAMING_DISABLED for a caller outside SSE_ROLLOUT_PERCENT; ``instead``: what to do."""
        if not in_rollout(identity.key, self.state.settings.sse_rollout_percent):
            raise NotFound(f"streaming is not yet enabled for this user; {instead}", code="STREAMING_DISABLED")

    async def _stream(self, request: Request, admission: Admission, chat: ChatInput, face: StreamFace) -> Response:
        """Open the stream (bridge/stream/opener.py) in ``face``'s format: every face's one path."""
        state = self.state
        request_id, _ = request_ids(request)
        response: Response = await self.opener.open(
            admission.identity,
            chat,
            request_id,
            trace_parent=_trace_parent(request),
            method=request.method,
            path=request.scope["path"],  # request.url would build a whole URL object per request
            respond=lambda session, opening: EventStreamResponse(
                session, 0, headers=admission.headers, connections=state.metrics, opening=opening, face=face
            ),
            face=face,
        )
        return response

    async def _resume(self, request: Request, stream_id: str, after_seq: int) -> Response:
        """A reconnect with ``Last-Event-ID``, within CONTROL_RATE_LIMIT (it may cost a store round
        trip). See :meth:`_expired_stream` for the one answer given for an id that is unknown, over,
        or someone else's."""
        state = self.state
        identity = await state.gate.control(request)
        session = state.registry.get(stream_id)
        store = state.resume_store
        if session is not None and (session.owner != identity.key or not session.resumable):
            # Someone else's, or a face without resume (an OpenAI stream): answered exactly like
            # an unknown id, by the same path.
            session = None
        if session is None:
            if store is None:
                return self._expired_stream(stream_id, after_seq)
            return await self._resume_remote(store, identity.key, stream_id, after_seq)
        resume = session.resume(after_seq)
        if isinstance(resume, StreamExpired):
            return self._expired_stream(stream_id, after_seq, resume)
        if resume is Resume.FROM_STORE:
            if store is None:
                return self._expired_stream(
                    stream_id,
                    after_seq,
                    StreamExpired("the frames after this event id are no longer held here", retryable=False),
                )
            return await self._resume_remote(store, identity.key, stream_id, after_seq)
        if resume is Resume.NOTHING_LEFT:
            return Response(status_code=204)  # the client has everything; 204 stops EventSource
        state.observer.reconnected()
        return EventStreamResponse(session, after_seq, connections=state.metrics)

    def _expired_stream(self, stream_id: str, after_seq: int, error: BridgeError | None = None) -> Response:
        """A late reconnect: one ``error`` frame, not retryable, so the client stops reconnecting.

        Without ``error`` this is also the answer for an unknown id and for another caller's live
        one, byte for byte: answering those 404 while unknown ids get STREAM_EXPIRED would tell
        an attacker which stream ids are live. The owner's own expired stream gets the same
        non-retryable STREAM_EXPIRED, so their browser client still stops reconnecting.
        """
        error = error or StreamExpired("the stream is no longer available; ask again", retryable=False)
        return ErrorFrameResponse(f"{stream_id}:{after_seq}", error, self.state.settings.heartbeat_interval_s)

    async def _resume_remote(self, store: ResumeStore, identity_key: str, stream_id: str, after_seq: int) -> Response:
        """A reconnect for a stream another instance owns (or dropped here), served from the store."""
        remote = await open_remote(store, stream_id, identity_key, after_seq)
        if isinstance(remote, NotFound):
            return self._expired_stream(stream_id, after_seq)  # someone else's: the unknown-id answer
        if isinstance(remote, BridgeError):
            # An SSE answer either way: STREAM_EXPIRED stops the client, RESUME_UNAVAILABLE is
            # retryable, so it reconnects (perhaps to the owner, which can still serve it).
            return self._expired_stream(stream_id, after_seq, remote)
        if isinstance(remote, NothingLeft):
            return Response(status_code=204)  # the client has everything; 204 stops EventSource
        self.state.observer.reconnected()
        self.state.registry.serve_from_store(remote)  # a drain ends it too
        return EventStreamResponse(remote, after_seq, connections=self.state.metrics)

    async def diagnostic_stream(self, request: Request) -> Response:
        """The stream ``bali-zero-bridge doctor`` reads (bridge/doctor/stream.py); no upstream call."""
        state = self.state
        try:
            idle_s = parse_idle(request.query_params.get("idle_s"), state.settings.heartbeat_interval_s)
            admission = await state.gate.admit(request)
        except Rejected as rejected:
            return error_response(rejected.error, rejected.headers)
        except BridgeError as exc:
            return error_response(exc)
        try:
            lease = await state.caps.take(admission.identity.key)  # counts against MAX_STREAMS_PER_USER
        except BridgeError as exc:
            return error_response(exc, admission.headers)
        return DiagnosticStream(
            idle_s=idle_s,
            last_event_id=request.headers.get("last-event-id"),
            heartbeat_interval_s=state.settings.heartbeat_interval_s,
            send_timeout_s=state.settings.send_timeout_s,
            headers=admission.headers,
            on_end=lease.release,
        )

    async def cancel_stream(self, request: Request) -> Response:
        """Explicit stop, within CONTROL_RATE_LIMIT. Someone else's stream takes the unknown-id path
        (same store round trip, same 404), so the answer never tells which ids are live."""
        state = self.state
        identity = await state.gate.control(request)
        stream_id = request.path_params["stream_id"]
        session = state.registry.get(stream_id)
        if session is not None and session.owner == identity.key:
            session.stop()
            return Response(status_code=204)
        store = state.resume_store
        try:
            if store is not None and await store.request_cancel(stream_id, identity.key):
                return Response(status_code=204)  # the owner's subscriber received the stop
        except BridgeError as exc:  # RESUME_UNAVAILABLE or OWNER_UNREACHABLE: retryable 503s
            return error_response(exc)
        return error_response(NotFound("no such stream", code="STREAM_NOT_FOUND"))

    # -- non-streaming ---------------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        state = self.state
        try:
            admission = await state.gate.admit(request)
        except Rejected as rejected:
            return error_response(rejected.error, rejected.headers)
        try:
            chat = await read_input(request, state.limits)
            reply, request_id, duration_ms = await self._answer(request, admission.identity, chat)
        except BridgeError as exc:
            return error_response(exc, admission.headers)
        body = {
            "answer": reply.answer,
            "sources": sources(reply.metadata),
            "model": reply.metadata.model,
            "request_id": request_id,
            "finish_reason": "length" if reply.completion.finish_reason == rag_pb2.FINISH_REASON_LENGTH else "stop",
            "metrics": {"tokens": reply.completion.token_count, "duration_ms": duration_ms},
        }
        return JSONResponse(body, headers=admission.headers)

    async def _answer(
        self, request: Request, identity: Identity, chat: ChatInput
    ) -> tuple[rag_pb2.ChatResponse, str, float]:
        """The whole answer (the RAG ``Chat`` call), audited as ``chat`` whatever its outcome:
        ``(reply, request id, duration in ms)``, or the call's ``BridgeError``. Every face's."""
        state = self.state
        request_id, trace_id = request_ids(request)
        started = time.monotonic()

        def audited(outcome: str, *, tokens: int | None = None, error_code: str | None = None) -> float:
            """Record the ``chat`` event for this answer; returns its duration in ms."""
            duration_ms = round((time.monotonic() - started) * 1000, 3)
            event = state.audit.events.chat(
                identity,
                request_id,
                trace_id,
                chat.query,
                outcome=outcome,
                duration_ms=duration_ms,
                tokens=tokens,
                error_code=error_code,
            )
            state.audit.record(event)
            return duration_ms

        try:
            reply = await state.rag.chat(chat_request(chat, identity, request_id))
        except BridgeError as exc:
            audited("error", error_code=exc.code)
            raise
        return reply, request_id, audited("completed", tokens=reply.completion.token_count)

    # -- the OpenAI-compatible face (the mapping: bridge/openai_compat.py) ------------------------

    async def openai_chat_completions(self, request: Request) -> Response:
        """``POST /v1/chat/completions``: the same gate, the same stream (or unary answer), in
        OpenAI's format; every error in OpenAI's shape.

        The body is read after the gate, as on the native POST, so ``stream`` is known only then:
        with streaming off (ENABLE_SSE_STREAMING, SSE_ROLLOUT_PERCENT) a ``stream: true`` request
        has spent its rate-limit hit when it gets its 404, and ``stream: false`` always works.
        """
        state = self.state
        try:
            admission = await state.gate.admit(request)
        except Rejected as rejected:
            return openai_compat.error_response(rejected.error, rejected.headers)
        except BridgeError as exc:
            return openai_compat.error_response(exc)
        try:
            body = await read_json_object(request, state.limits)
            asked = openai_compat.parse_request(body, state.limits, state.settings.openai_models)
            if not asked.stream:
                reply, request_id, _ = await self._answer(request, admission.identity, asked.chat)
                completion = openai_compat.completion_body(reply, asked.model, request_id)
                return JSONResponse(completion, headers=admission.headers)
            if not state.settings.enable_sse_streaming:
                raise NotFound(
                    "streaming is disabled on this server (ENABLE_SSE_STREAMING=false); send stream: false",
                    code="STREAMING_DISABLED",
                )
            self._check_rollout(admission.identity, "send stream: false")
            face = openai_compat.OpenAIFace(asked.model, asked.include_usage)
            return await self._stream(request, admission, asked.chat, face)
        except BridgeError as exc:
            return openai_compat.error_response(exc, admission.headers)

    async def openai_models(self, request: Request) -> Response:
        """``GET /v1/models``: OPENAI_MODELS, to callers the gate knows, within CONTROL_RATE_LIMIT."""
        try:
            await self.state.gate.control(request)
        except BridgeError as exc:
            return openai_compat.error_response(exc)
        return JSONResponse(openai_compat.models_body(self.state.settings.openai_models))

    # -- observability ---------------------------------------------------------------------------

    async def metrics(self, request: Request) -> Response:
        body, content_type = self.state.metrics.render()
        return Response(body, headers={"content-type": content_type})

    async def stream_stats(self, request: Request) -> Response:
        """The whole server's stats: with several workers, every worker's figures merged."""
        state = self.state
        own = worker_stats(state)
        role = state.role
        parts = [own]
        if role.count > 1 and role.peers_dir is not None:
            parts = await gather_peers(role.peers_dir, role.slot, role.count, own)
        snapshot = merge_snapshots(state.settings.stats_window_s, parts)
        snapshot["sessions_held"] = sum(part["sessions_held"] for part in parts)
        snapshot["open_connections_by_cap"] = sum(part["open_connections_by_cap"] for part in parts)
        if role.count > 1:
            snapshot["workers"] = {"count": role.count, "reporting": len(parts)}
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


def worker_stats(state: BridgeState) -> dict[str, Any]:
    """This worker's part of the stats endpoint (``StreamStats.export`` plus its held sessions and
    open streams), what it answers its peers."""
    return {
        **state.stats.export(),
        "sessions_held": len(state.registry),
        "open_connections_by_cap": state.caps.open_total,
    }


def _trace_parent(request: Request) -> Context:
    """The caller's trace: the ``traceparent`` header, or the query parameter EventSource must use."""
    carrier = {
        name: value
        for name in ("traceparent", "tracestate")
        if (value := request.headers.get(name) or request.query_params.get(name))
    }
    if not carrier:
        return Context()  # what extracting nothing gives, without running the propagators
    return Telemetry.extract_context(carrier)
