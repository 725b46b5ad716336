"""Tracing for the bridge: one explicit TracerProvider per app, built from ``settings.otel``.

Why explicit and not the global provider: the OTel global can be set only once per process, so two
apps in one test process (or a reload) would silently share the first app's exporter. Every span
here comes from ``Telemetry.tracer``; nothing calls ``trace.set_tracer_provider``.

Why our own small gRPC client tracing instead of opentelemetry-instrumentation-grpc's
``aio_client_interceptors``: its unary-stream interceptor ends the client span in the ``finally`` of
the response async generator, so after ``call.cancel()`` the span ends only if the caller keeps
iterating (and then with status UNSET), and when the caller uses ``call.read()`` it never ends at
all. Ours ends the span from the call's done callback, which fires on completion, error and
cancellation alike, and it hands back the real call object, so ``read()`` and ``cancel()`` keep
working (see tests/e2e/test_telemetry_grpc.py). Streams are traced without any interceptor at all
(``StreamTracing``): cancelling an intercepted stream mid-read leaks native memory in grpcio.

The provider itself is built from ``OTEL_*`` by ``bzb_shared.otel`` (shared with the stub, which must
not import the bridge).

Tracing is off unless ``OTEL_TRACES_EXPORTER`` names an exporter or an OTLP endpoint is set. (The
SDK's own default is "otlp", which would make every developer run try localhost:4317.) Off means
a ``NoOpTracer``, no interceptors or stream tracing and no span processors: a stream then costs one tiny
``NonRecordingSpan`` that still carries the caller's trace id for log correlation.

A request is known by two ids (``request_ids``): its request id (echoed, logged, audited), a
client's ``x-request-id`` only in a safe alphabet and length, and its trace id, from
``traceparent``.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Awaitable, Coroutine, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from starlette.requests import Request

from bridge.types import StreamResult
from bzb_shared.otel import PROPAGATOR, build_tracer_provider

INSTRUMENTATION_NAME = "bali_zero_bridge"

__all__ = [
    "PROPAGATOR",
    "StreamTracing",
    "Telemetry",
    "build_tracer_provider",
    "client_interceptors_for",
    "trace_id_of",
]


# --------------------------------------------------------------------------- gRPC client side


class _MetadataSetter(Setter[list[tuple[str, str]]]):
    """Writes propagation headers into a list of metadata pairs (gRPC keys must be lower case)."""

    def set(self, carrier: list[tuple[str, str]], key: str, value: str) -> None:
        carrier.append((key.lower(), value))


_SETTER = _MetadataSetter()


def _method_name(method: str | bytes) -> str:
    # grpc.aio sometimes hands the method over as bytes (grpc/grpc#31092).
    return method.decode() if isinstance(method, bytes) else method


def _rpc_attributes(method: str) -> dict[str, str]:
    service, _, name = method.lstrip("/").partition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


async def _finish_client_span(span: Span, call: grpc.aio.Call, ended_ns: int) -> None:
    """Record the final status and end the span with the time the call really finished."""
    try:
        code = await call.code()
        details = await call.details()
    except asyncio.CancelledError:  # the call was cancelled before it was sent
        code, details = grpc.StatusCode.CANCELLED, "cancelled"
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code != grpc.StatusCode.OK:
        span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details}"))
    span.end(end_time=ended_ns)


class _KeptTasks:
    """Tasks kept referenced until they finish: the event loop holds only weak references, so a
    fire-and-forget task (a span ended after its call) could be collected before it ran."""

    __slots__ = ("_tasks",)

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class ClientCallTracer:
    """Starts a CLIENT span in the caller's context, injects it, and ends it when the call is done.

    The span's parent is whatever span is current when the call is started (``stub.Method(...)``
    time for an interceptor, whose task copies the caller's contextvars; ``start`` time here).
    """

    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer
        self._pending = _KeptTasks()  # status readers until their spans end

    def start(self, method: str | bytes, metadata: Any) -> tuple[Span, list[tuple[str, str]]]:
        """A new CLIENT span for ``method`` and ``metadata`` with its context injected."""
        name = _method_name(method)
        span = self._tracer.start_span(name, kind=SpanKind.CLIENT, attributes=_rpc_attributes(name))
        carrier: list[tuple[str, str]] = [(str(k), str(v)) for k, v in (metadata or ())]
        PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span), setter=_SETTER)
        return span, carrier

    @staticmethod
    def failed(span: Span, exc: BaseException) -> None:
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        span.end()

    def watch(self, span: Span, call: Any) -> None:
        """End ``span`` from the call's done callback: completion, error and cancellation alike."""

        def done(finished: grpc.aio.Call) -> None:
            self._pending.spawn(_finish_client_span(span, finished, time.time_ns()))

        call.add_done_callback(done)


class StreamTracing(ClientCallTracer):
    """Traces server-streaming calls *without* a grpc.aio interceptor.

    Why: an intercepted unary-stream call is read through grpc.aio's async-generator wrapper
    (``InterceptedUnaryStreamCall.read``), and cancelling such a call while a read is pending
    leaks native memory that closing the channel does not return, where the same cancel on a plain
    call leaks nothing (tests/support/grpc_cancel.py compares the two; the same family as
    grpc/grpc#43360). With tracing on, every disconnect would leak. ``bridge.upstream.Upstream``
    opens its streams through ``open``.
    """

    def open(self, multicallable: Any, request: Any, *, method: str, timeout: float, metadata: Any) -> Any:
        span, carrier = self.start(method, metadata)
        try:
            call = multicallable(request, timeout=timeout, metadata=tuple(carrier))
        except BaseException as exc:
            self.failed(span, exc)
            raise
        self.watch(span, call)
        return call


class _ClientInterceptorBase(ClientCallTracer):
    """The tracer as a grpc.aio interceptor, for unary calls (their calls are never read in parts)."""

    async def _intercept(self, continuation: Any, details: grpc.aio.ClientCallDetails, request: Any) -> Any:
        span, carrier = self.start(details.method, details.metadata)
        new_details = grpc.aio.ClientCallDetails(
            details.method,
            details.timeout,
            grpc.aio.Metadata(*carrier),
            details.credentials,
            details.wait_for_ready,
        )
        try:
            call = await continuation(new_details, request)
        except BaseException as exc:
            self.failed(span, exc)
            raise
        self.watch(span, call)
        return call


class _UnaryUnaryTracing(_ClientInterceptorBase, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await self._intercept(continuation, client_call_details, request)


class _UnaryStreamTracing(_ClientInterceptorBase, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await self._intercept(continuation, client_call_details, request)


def client_interceptors_for(tracer: trace.Tracer) -> list[Any]:
    """Tracing interceptors for a grpc.aio channel (unary-unary and unary-stream RPCs).

    The bridge's own channel takes only the unary one: its streams are traced by ``StreamTracing``
    (see there why an intercepted stream must not be cancelled mid-read).
    """
    return [_UnaryUnaryTracing(tracer), _UnaryStreamTracing(tracer)]


# --------------------------------------------------------------------------- the bridge's own spans


def trace_id_of(span: Span | None) -> str | None:
    """The span's trace id as 32 hex digits, or None for an invalid (absent) span context."""
    if span is None:
        return None
    ctx = span.get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


class _HeaderGetter(Getter[Mapping[str, str]]):
    """Reads propagation headers from a case-insensitive or lower-cased header mapping."""

    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        value = carrier.get(key)
        if value is None:
            value = carrier.get(key.lower())
        return [value] if value is not None else None

    def keys(self, carrier: Mapping[str, str]) -> list[str]:
        return list(carrier.keys())


_GETTER = _HeaderGetter()


class Telemetry:
    """The bridge's tracing handle: a tracer, gRPC interceptors and helpers for the stream span."""

    def __init__(self, provider: TracerProvider | None) -> None:
        self.provider = provider
        self.enabled = provider is not None
        self.tracer: trace.Tracer = (
            provider.get_tracer(INSTRUMENTATION_NAME) if provider is not None else trace.NoOpTracer()
        )
        self._pending = _KeptTasks()  # stream spans waiting for their gRPC call

    @classmethod
    def from_settings(cls, settings: Any, *, extra_processors: tuple[SpanProcessor, ...] = ()) -> Telemetry:
        """Build from ``settings.otel`` (the OTEL_* variables); service name defaults to the bridge's."""
        return cls.from_environ(settings.otel, extra_processors=extra_processors)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], *, extra_processors: tuple[SpanProcessor, ...] = ()) -> Telemetry:
        return cls(build_tracer_provider(environ, "bali-zero-bridge", extra_processors=extra_processors))

    def client_interceptors(self) -> list[Any]:
        """Interceptors for the upstream channel (unary calls); [] when tracing is off (no cost)."""
        return [_UnaryUnaryTracing(self.tracer)] if self.enabled else []

    def stream_tracing(self) -> StreamTracing | None:
        """How the upstream channel traces its streams; None when tracing is off."""
        return StreamTracing(self.tracer) if self.enabled else None

    @staticmethod
    def extract_context(headers: Mapping[str, str]) -> Context:
        """The caller's context from ``traceparent``/``tracestate``/``baggage`` (empty if absent/bad)."""
        return PROPAGATOR.extract(headers, getter=_GETTER)

    def start_stream_span(
        self,
        name: str,
        parent: Context | None = None,
        attributes: Mapping[str, str | int | float | bool] | None = None,
    ) -> Span:
        """Start the bridge's SERVER span for one stream; the caller ends it with ``end_stream_span``.

        It is deliberately not a context manager: the HTTP handler returns long before the last
        SSE frame is sent, and a span ended there (what ASGI instrumentation does) would measure
        nothing. Make it current around ``stub.StreamChat(...)`` with ``activate`` so the gRPC
        client span becomes its child.
        """
        if not self.enabled:
            # Keep the caller's ids for log correlation without recording anything.
            return trace.NonRecordingSpan(trace.get_current_span(parent).get_span_context())
        return self.tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes)

    @staticmethod
    @contextmanager
    def activate(span: Span) -> Iterator[Span]:
        """Make ``span`` current for the block without ending it on exit."""
        with trace.use_span(span, end_on_exit=False):
            yield span

    @staticmethod
    def record_first_token(span: Span, ms: float) -> None:
        """Mark the first token on the timeline and as an attribute (queryable in most backends)."""
        if span.is_recording():
            span.add_event("first_token", {"first_token_ms": ms})
            span.set_attribute("first_token_ms", ms)

    @staticmethod
    def end_stream_span(span: Span, result: StreamResult) -> None:
        """Attach the stream's outcome and end the span (call once, after the final frame)."""
        if span.is_recording():
            span.set_attribute("tokens", result.tokens)
            span.set_attribute("outcome", result.outcome)
            span.set_attribute("duration_ms", result.duration_ms)
            if result.first_token_ms is not None:
                span.set_attribute("first_token_ms", result.first_token_ms)
            if result.error_code is not None:
                span.set_attribute("error.code", result.error_code)
            if result.outcome == "error":
                span.set_status(Status(StatusCode.ERROR, result.error_code or "error"))
        span.end()

    def end_stream_span_after(self, upstream_closed: Awaitable[None], span: Span, result: StreamResult) -> None:
        """``end_stream_span`` once ``upstream_closed`` is over, so a parent span never ends before
        the gRPC client span it contains (the call's status can arrive after the final frame)."""

        async def end_after() -> None:
            try:
                await upstream_closed
            finally:
                self.end_stream_span(span, result)

        self._pending.spawn(end_after())

    def shutdown(self) -> None:
        """Flush and stop the exporters. Blocking: from async code use ``asyncio.to_thread``."""
        if self.provider is not None:
            self.provider.shutdown()


# ------------------------------------------------------------------- the ids a request is known by
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
