"""Tracing for the bridge: one explicit TracerProvider per app, built from ``settings.otel``.

Why explicit and not the global provider: the OTel global can be set only once per process, so two
apps in one test process (or a reload) would silently share the first app's exporter. Every span
here comes from ``Telemetry.tracer``; nothing calls ``trace.set_tracer_provider``.

Why our own small gRPC client interceptors instead of opentelemetry-instrumentation-grpc's
``aio_client_interceptors``: its unary-stream interceptor ends the client span in the ``finally`` of
the response async generator, so after ``call.cancel()`` the span ends only if the caller keeps
iterating (and then with status UNSET), and when the caller uses ``call.read()`` it never ends at
all. Ours ends the span from the call's done callback, which fires on completion, error and
cancellation alike, and it hands back the real call object, so ``read()`` and ``cancel()`` keep
working (see tests/test_telemetry_grpc.py).

Propagation uses W3C tracecontext + baggage through a module-level propagator instead of the
global one, whose choice depends on ``OTEL_PROPAGATORS`` in ``os.environ`` at import time.

Tracing is off unless ``OTEL_TRACES_EXPORTER`` names an exporter or an OTLP endpoint is set. (The
SDK's own default is "otlp", which would make every developer run try localhost:4317.) Off means
a ``NoOpTracer``, no interceptors and no span processors: a stream then costs one tiny
``NonRecordingSpan`` that still carries the caller's trace id for log correlation.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    ParentBasedTraceIdRatio,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from bridge.types import StreamResult

PROPAGATOR = CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])
INSTRUMENTATION_NAME = "bali_zero_bridge"

__all__ = [
    "PROPAGATOR",
    "Telemetry",
    "TelemetryConfigError",
    "build_tracer_provider",
    "client_interceptors_for",
    "trace_id_of",
]


class TelemetryConfigError(ValueError):
    """An OTEL_* variable has a value we cannot use; the message names it."""


# --------------------------------------------------------------------------- provider from OTEL_*


def _parse_pairs(raw: str) -> dict[str, str]:
    """``k1=v1,k2=v2`` as used by OTEL_RESOURCE_ATTRIBUTES and OTEL_EXPORTER_OTLP_HEADERS."""
    from urllib.parse import unquote

    pairs: dict[str, str] = {}
    for part in raw.split(","):
        if "=" in part:
            key, value = part.split("=", 1)
            if key.strip():
                pairs[unquote(key.strip())] = unquote(value.strip())
    return pairs


def _sampler(environ: Mapping[str, str]) -> Sampler:
    name = environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    arg = environ.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    try:
        ratio = float(arg) if arg else 1.0
    except ValueError:
        raise TelemetryConfigError(f"OTEL_TRACES_SAMPLER_ARG={arg!r}: expected a number in 0..1") from None
    if not 0.0 <= ratio <= 1.0:
        raise TelemetryConfigError(f"OTEL_TRACES_SAMPLER_ARG={arg!r}: expected a number in 0..1")
    choices: dict[str, Callable[[], Sampler]] = {
        "always_on": lambda: ALWAYS_ON,
        "always_off": lambda: ALWAYS_OFF,
        "traceidratio": lambda: TraceIdRatioBased(ratio),
        "parentbased_always_on": lambda: ParentBased(ALWAYS_ON),
        "parentbased_always_off": lambda: ParentBased(ALWAYS_OFF),
        "parentbased_traceidratio": lambda: ParentBasedTraceIdRatio(ratio),
    }
    if name not in choices:
        raise TelemetryConfigError(f"OTEL_TRACES_SAMPLER={name!r}: expected one of {', '.join(choices)}")
    return choices[name]()


def _otlp_exporter(environ: Mapping[str, str]) -> SpanExporter:
    # Imported lazily: the gRPC exporter pulls in a second grpc channel stack nobody needs when off.
    from urllib.parse import urlparse

    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    def pick(suffix: str, default: str = "") -> str:
        specific = environ.get(f"OTEL_EXPORTER_OTLP_TRACES_{suffix}")
        return specific or environ.get(f"OTEL_EXPORTER_OTLP_{suffix}") or default

    endpoint = pick("ENDPOINT", "http://localhost:4317")
    insecure_raw = pick("INSECURE")
    insecure = insecure_raw.lower() == "true" if insecure_raw else urlparse(endpoint).scheme == "http"
    try:
        timeout = float(pick("TIMEOUT", "10000")) / 1000  # the spec gives milliseconds
    except ValueError:
        raise TelemetryConfigError("OTEL_EXPORTER_OTLP_TIMEOUT: expected milliseconds") from None
    compression = grpc.Compression.Gzip if pick("COMPRESSION") == "gzip" else grpc.Compression.NoCompression
    # Everything is passed explicitly so that the exporter does not fall back to os.environ.
    return OTLPSpanExporter(
        endpoint=endpoint,
        insecure=insecure,
        headers=_parse_pairs(pick("HEADERS")),
        timeout=timeout,
        compression=compression,
    )


def _int_env(environ: Mapping[str, str], name: str, default: int) -> int:
    """A positive integer OTEL_* setting (the SDK's own names and defaults)."""
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise TelemetryConfigError(f"{name}={raw!r}: expected a whole number") from None
    if value <= 0:
        raise TelemetryConfigError(f"{name}={raw!r}: must be > 0")
    return value


def _exporter_names(environ: Mapping[str, str]) -> list[str]:
    raw = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not raw:
        endpoints = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
        return ["otlp"] if any(environ.get(name) for name in endpoints) else []
    names = [n.strip() for n in raw.split(",") if n.strip() and n.strip() != "none"]
    for name in names:
        if name not in {"otlp", "console"}:
            raise TelemetryConfigError(f"OTEL_TRACES_EXPORTER={raw!r}: expected otlp, console or none")
    return names


def build_tracer_provider(
    environ: Mapping[str, str],
    default_service_name: str,
    *,
    shutdown_on_exit: bool = False,
    extra_processors: tuple[SpanProcessor, ...] = (),
) -> TracerProvider | None:
    """A TracerProvider configured from OTEL_* variables, or None when tracing is off.

    ``extra_processors`` lets tests attach an in-memory exporter to a provider that is otherwise
    configured exactly as in production (with them, tracing is on even without an exporter).
    """
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    names = _exporter_names(environ)
    if not names and not extra_processors:
        return None
    attributes: dict[str, str] = _parse_pairs(environ.get("OTEL_RESOURCE_ATTRIBUTES", ""))
    attributes["service.name"] = (
        environ.get("OTEL_SERVICE_NAME") or attributes.get("service.name") or default_service_name
    )
    provider = TracerProvider(
        sampler=_sampler(environ),
        # Resource(...) rather than Resource.create(...): create() reads os.environ itself.
        resource=Resource(attributes),
        span_limits=SpanLimits(max_attributes=128, max_events=128, max_links=128),
        shutdown_on_exit=shutdown_on_exit,
    )
    for name in names:
        if name == "otlp":
            provider.add_span_processor(
                BatchSpanProcessor(
                    _otlp_exporter(environ),
                    max_queue_size=_int_env(environ, "OTEL_BSP_MAX_QUEUE_SIZE", 2048),
                    schedule_delay_millis=_int_env(environ, "OTEL_BSP_SCHEDULE_DELAY", 5000),
                    max_export_batch_size=_int_env(environ, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512),
                    export_timeout_millis=_int_env(environ, "OTEL_BSP_EXPORT_TIMEOUT", 30000),
                )
            )
        else:
            # stderr, not stdout: the stub's stdout carries the stream_end JSON lines tests parse.
            provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
    for processor in extra_processors:
        provider.add_span_processor(processor)
    return provider


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


class _ClientInterceptorBase:
    """Starts a CLIENT span in the caller's context, injects it, and ends it when the call is done.

    grpc.aio runs interceptors in a task created when the stub method is called, which copies the
    caller's contextvars: the parent is whatever span is current at ``stub.Method(...)`` time.
    """

    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer
        self._pending: set[asyncio.Task[None]] = set()

    async def _intercept(self, continuation: Any, details: grpc.aio.ClientCallDetails, request: Any) -> Any:
        method = _method_name(details.method)
        span = self._tracer.start_span(method, kind=SpanKind.CLIENT, attributes=_rpc_attributes(method))
        metadata: list[tuple[str, str]] = [(str(k), str(v)) for k, v in (details.metadata or ())]
        PROPAGATOR.inject(metadata, context=trace.set_span_in_context(span), setter=_SETTER)
        new_details = grpc.aio.ClientCallDetails(
            details.method, details.timeout, grpc.aio.Metadata(*metadata), details.credentials,
            details.wait_for_ready,
        )
        try:
            call = await continuation(new_details, request)
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            span.end()
            raise
        loop = asyncio.get_running_loop()

        def done(finished: grpc.aio.Call) -> None:
            task = loop.create_task(_finish_client_span(span, finished, time.time_ns()))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

        call.add_done_callback(done)
        return call


class _UnaryUnaryTracing(_ClientInterceptorBase, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await self._intercept(continuation, client_call_details, request)


class _UnaryStreamTracing(_ClientInterceptorBase, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await self._intercept(continuation, client_call_details, request)


def client_interceptors_for(tracer: trace.Tracer) -> list[Any]:
    """Tracing interceptors for a grpc.aio channel (unary-unary and unary-stream RPCs)."""
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

    @classmethod
    def from_settings(cls, settings: Any, *, extra_processors: tuple[SpanProcessor, ...] = ()) -> Telemetry:
        """Build from ``settings.otel`` (the OTEL_* variables); service name defaults to the bridge's."""
        return cls.from_environ(settings.otel, extra_processors=extra_processors)

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str], *, extra_processors: tuple[SpanProcessor, ...] = ()
    ) -> Telemetry:
        return cls(build_tracer_provider(environ, "bali-zero-bridge", extra_processors=extra_processors))

    def client_interceptors(self) -> list[Any]:
        """Interceptors for the upstream channel; [] when tracing is off (no per-call cost at all)."""
        return client_interceptors_for(self.tracer) if self.enabled else []

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

    def force_flush(self, timeout_ms: int = 30_000) -> bool:
        return self.provider.force_flush(timeout_ms) if self.provider is not None else True

    def shutdown(self) -> None:
        """Flush and stop the exporters. Blocking: from async code use ``asyncio.to_thread``."""
        if self.provider is not None:
            self.provider.shutdown()
