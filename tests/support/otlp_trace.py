"""An OTLP/gRPC trace receiver that keeps every span field end-to-end tests look at.

``tests/support/otlp.OtlpReceiver`` flattens spans down to ids, kind and attributes. The
cross-process tests also need timestamps, events and status, and one test needs a receiver on a
chosen port (the SDK's default ``localhost:4317``), so this one keeps the whole picture.
Like ``OtlpReceiver`` it is a synchronous grpc server on its own threads; waiting is a condition
with a timeout, never a sleep.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

SPAN_KIND_SERVER = 2
SPAN_KIND_CLIENT = 3
STATUS_CODE_UNSET = 0
STATUS_CODE_OK = 1
STATUS_CODE_ERROR = 2


def _value(any_value: Any) -> Any:
    field = any_value.WhichOneof("value")
    return getattr(any_value, field) if field else None


@dataclass(frozen=True, slots=True)
class SpanEvent:
    name: str
    time_unix_nano: int
    attributes: dict[str, Any]


@dataclass(frozen=True, slots=True)
class FullSpan:
    service_name: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    start_time_unix_nano: int
    end_time_unix_nano: int
    attributes: dict[str, Any]
    events: tuple[SpanEvent, ...]
    status_code: int
    status_message: str


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: TraceReceiver) -> None:
        self._receiver = receiver

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self._receiver.add(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class TraceReceiver:
    """Collects exported spans with timestamps, events and status; counts export requests."""

    def __init__(self, address: str = "127.0.0.1:0") -> None:
        self.spans: list[FullSpan] = []
        self.requests = 0
        self._cond = threading.Condition()
        # No SO_REUSEPORT: binding a fixed port must fail, not share it with another listener.
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=[("grpc.so_reuseport", 0)])
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), self._server)
        self.port = int(self._server.add_insecure_port(address))
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def start(self) -> TraceReceiver:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(None).wait()

    def __enter__(self) -> TraceReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        received: list[FullSpan] = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(
                        FullSpan(
                            service_name=str(resource.get("service.name", "")),
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            kind=span.kind,
                            start_time_unix_nano=span.start_time_unix_nano,
                            end_time_unix_nano=span.end_time_unix_nano,
                            attributes={a.key: _value(a.value) for a in span.attributes},
                            events=tuple(
                                SpanEvent(e.name, e.time_unix_nano, {a.key: _value(a.value) for a in e.attributes})
                                for e in span.events
                            ),
                            status_code=span.status.code,
                            status_message=span.status.message,
                        )
                    )
        with self._cond:
            self.requests += 1
            self.spans.extend(received)
            self._cond.notify_all()

    def wait_until(self, predicate: Callable[[list[FullSpan]], bool], timeout: float = 15.0) -> list[FullSpan]:
        """All spans once ``predicate(spans)`` holds; AssertionError (listing them) after ``timeout``."""
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self.spans), timeout):
                raise AssertionError(f"condition not met within {timeout}s; spans: {self.spans}")
            return list(self.spans)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[FullSpan]:
        """All spans once at least ``count`` have arrived; AssertionError after ``timeout``."""
        return self.wait_until(lambda spans: len(spans) >= count, timeout)
