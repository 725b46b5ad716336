"""Tracing configuration from OTEL_* mappings, and the near-free path when tracing is off."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan

from bridge.config import Settings
from bridge.errors import TelemetryConfigError
from bridge.telemetry import Telemetry, build_tracer_provider, trace_id_of
from bridge.types import StreamResult
from rag_stub.telemetry import server_interceptors

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_off_by_default_costs_nothing_but_keeps_the_callers_trace_id() -> None:
    telemetry = Telemetry.from_settings(Settings())
    assert not telemetry.enabled and telemetry.client_interceptors() == []
    span = telemetry.start_stream_span("s", telemetry.extract_context({"traceparent": TRACEPARENT}))
    assert isinstance(span, NonRecordingSpan) and not span.is_recording()
    assert trace_id_of(span) == "4bf92f3577b34da6a3ce929d0e0e4736"
    telemetry.record_first_token(span, 1.0)
    telemetry.end_stream_span(span, StreamResult("s", "r", "completed", 1, 1.0, 1.0))
    assert trace_id_of(telemetry.start_stream_span("s", telemetry.extract_context({}))) is None
    telemetry.shutdown()


@pytest.mark.parametrize(
    "env",
    [{}, {"OTEL_TRACES_EXPORTER": "none"}, {"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "console"}],
)
def test_no_exporter_means_no_provider(env: dict[str, str]) -> None:
    assert build_tracer_provider(env, "x") is None
    assert server_interceptors(env) == []


def test_endpoint_alone_turns_otlp_on_and_service_name_wins() -> None:
    env = {
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:1",
        "OTEL_SERVICE_NAME": "edge",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test,service.name=ignored",
    }
    provider = build_tracer_provider(env, "bali-zero-bridge")
    assert provider is not None
    assert provider.resource.attributes["service.name"] == "edge"
    assert provider.resource.attributes["deployment.environment"] == "test"
    provider.shutdown()


def test_sampler_from_env() -> None:
    provider = build_tracer_provider(
        {
            "OTEL_TRACES_EXPORTER": "none,console",
            "OTEL_TRACES_SAMPLER": "traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.25",
        },
        "x",
    )
    assert provider is not None and isinstance(provider.sampler, TraceIdRatioBased)
    assert provider.sampler.rate == 0.25
    default = build_tracer_provider({"OTEL_TRACES_EXPORTER": "console"}, "x")
    assert default is not None and isinstance(default.sampler, ParentBased)


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER"),
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_TRACES_SAMPLER_ARG": "2"}, "OTEL_TRACES_SAMPLER_ARG"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], names: str) -> None:
    with pytest.raises(TelemetryConfigError, match=names):
        build_tracer_provider(env, "x")


def test_two_apps_in_one_process_keep_their_own_providers() -> None:
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    first, second = InMemorySpanExporter(), InMemorySpanExporter()
    a = Telemetry.from_environ({}, extra_processors=(SimpleSpanProcessor(first),))
    b = Telemetry.from_environ({}, extra_processors=(SimpleSpanProcessor(second),))
    a.end_stream_span(a.start_stream_span("a"), StreamResult("s", "r", "error", 0, 1.0, None, error_code="x"))
    b.end_stream_span(b.start_stream_span("b"), StreamResult("s", "r", "completed", 0, 1.0, None))
    assert [s.name for s in first.get_finished_spans()] == ["a"]
    assert [s.name for s in second.get_finished_spans()] == ["b"]
    (failed,) = first.get_finished_spans()
    assert failed.attributes is not None and failed.attributes["error.code"] == "x"
    a.shutdown()
    b.shutdown()
