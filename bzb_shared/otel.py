"""Tracing set-up shared by the bridge and the stub: a TracerProvider built from ``OTEL_*`` variables.

Why a package of its own: the stub (``rag_stub``) is the fake upstream the bridge is tested
against, so it must not import the bridge (the system under test); both need the same reading of
the ``OTEL_*`` variables and the same propagator, so that reading lives here, beside them, and
depends on neither.

Propagation uses W3C tracecontext + baggage through a module-level propagator instead of the
global one, whose choice depends on ``OTEL_PROPAGATORS`` in ``os.environ`` at import time.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping

import grpc
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.composite import CompositePropagator
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
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

PROPAGATOR = CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])

__all__ = ["PROPAGATOR", "TelemetryConfigError", "build_tracer_provider", "check_telemetry_environ"]


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


def check_telemetry_environ(environ: Mapping[str, str]) -> None:
    """Raise TelemetryConfigError for an OTEL_* value the provider would refuse, building nothing.

    Called from settings validation, so a bad sampler fails start-up before any file is written.
    """
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return
    names = _exporter_names(environ)
    _sampler(environ)
    _parse_pairs(environ.get("OTEL_RESOURCE_ATTRIBUTES", ""))
    if "otlp" in names:
        for name in (
            "OTEL_BSP_MAX_QUEUE_SIZE",
            "OTEL_BSP_SCHEDULE_DELAY",
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
            "OTEL_BSP_EXPORT_TIMEOUT",
        ):
            _int_env(environ, name, 1)
        for prefix in ("OTEL_EXPORTER_OTLP_TRACES_", "OTEL_EXPORTER_OTLP_"):
            _parse_pairs(environ.get(prefix + "HEADERS", ""))
            timeout = environ.get(prefix + "TIMEOUT", "").strip()
            if timeout:
                try:
                    float(timeout)
                except ValueError:
                    raise TelemetryConfigError(f"{prefix}TIMEOUT={timeout!r}: expected milliseconds") from None


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
