"""Tracing across a real gRPC hop: bridge stream tracing → in-process stub with its server interceptor.

Also pins down the two findings that made us write our own interceptors: cancellation must still
reach the stub (it logs ``cancelled``) and the client span must end even when the caller stops
reading after ``cancel()`` or reads with ``call.read()``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.trace import SpanKind, StatusCode

from bali_zero.rag.v1 import rag_pb2, rag_pb2_grpc
from bridge.telemetry import Telemetry, trace_id_of
from bridge.types import StreamResult
from rag_stub.server import StubConfig, start_server
from rag_stub.telemetry import server_interceptors
from tests.support.otlp_trace import TraceReceiver

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
STREAM_METHOD = "/bali_zero.rag.v1.RagService/StreamChat"


class Collector(SpanProcessor):
    """Keeps ended spans and wakes the test's event loop; a test awaits a predicate, never sleeps."""

    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()

    def on_end(self, span: ReadableSpan) -> None:
        self.spans.append(span)
        self._loop.call_soon_threadsafe(self._changed.set)

    async def wait_until(self, predicate: Callable[[list[ReadableSpan]], bool]) -> None:
        async with asyncio.timeout(10):
            while not predicate(self.spans):
                self._changed.clear()
                await self._changed.wait()

    def one(self, kind: SpanKind, name: str = STREAM_METHOD) -> ReadableSpan:
        found = [s for s in self.spans if s.kind == kind and s.name == name]
        assert len(found) == 1, self.spans
        return found[0]


class StreamEnds:
    """The stub's stream_end records, awaitable by request id."""

    def __init__(self) -> None:
        self.records: dict[str, dict[str, Any]] = {}
        self._changed = asyncio.Event()

    def __call__(self, record: dict[str, Any]) -> None:
        self.records[record["request_id"]] = record
        self._changed.set()

    async def wait(self, request_id: str) -> dict[str, Any]:
        async with asyncio.timeout(10):
            while request_id not in self.records:
                self._changed.clear()
                await self._changed.wait()
        return self.records[request_id]


def rag_stub(channel: grpc.aio.Channel) -> Any:
    return rag_pb2_grpc.RagServiceStub(channel)


def stream_chat(telemetry: Telemetry, stub: Any, request: rag_pb2.StreamChatRequest) -> Any:
    """StreamChat traced the way bridge.upstream.Upstream does it (no stream interceptor)."""
    tracing = telemetry.stream_tracing()
    assert tracing is not None
    return tracing.open(stub.StreamChat, request, method=STREAM_METHOD, timeout=30, metadata=())


def channel_to(port: int, telemetry: Telemetry) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=telemetry.client_interceptors())


def stub_interceptors(collector: Collector) -> list[Any]:
    return list(server_interceptors({}, extra_processors=(collector,)))


@pytest.fixture
async def collector() -> Collector:
    return Collector()


@pytest.fixture
async def traced(collector: Collector) -> AsyncIterator[tuple[Telemetry, Any, StreamEnds]]:
    ends = StreamEnds()
    config = StubConfig(mode="echo", repeat=2000, token_delay_ms=2)
    server, port = await start_server(config, port=0, on_stream_end=ends, interceptors=stub_interceptors(collector))
    telemetry = Telemetry.from_environ({}, extra_processors=(collector,))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=telemetry.client_interceptors())
    try:
        yield telemetry, rag_stub(channel), ends
    finally:
        await channel.close(None)
        await server.stop(None)
        telemetry.shutdown()


async def test_one_trace_from_traceparent_through_bridge_to_stub(collector: Collector) -> None:
    ends = StreamEnds()
    server, port = await start_server(
        StubConfig(mode="echo"),
        port=0,
        on_stream_end=ends,
        interceptors=stub_interceptors(collector),
    )
    telemetry = Telemetry.from_environ({}, extra_processors=(collector,))
    try:
        parent = telemetry.extract_context({"traceparent": TRACEPARENT})
        span = telemetry.start_stream_span("GET /api/v2/bali-zero/chat-stream", parent)
        async with channel_to(port, telemetry) as ch:
            with telemetry.activate(span):
                call = stream_chat(
                    telemetry, rag_stub(ch), rag_pb2.StreamChatRequest(query="hello trace", request_id="r1")
                )
            tokens = [r.token.text async for r in call if r.HasField("token")]
        assert "".join(tokens) == "hello trace"
        telemetry.record_first_token(span, 12.5)
        telemetry.end_stream_span(span, StreamResult("s1", "r1", "completed", len(tokens), 40.0, 12.5))
        await collector.wait_until(lambda spans: len(spans) >= 3)
    finally:
        await server.stop(None)
        telemetry.shutdown()

    bridge = collector.one(SpanKind.SERVER, "GET /api/v2/bali-zero/chat-stream")
    client = collector.one(SpanKind.CLIENT)
    stub = collector.one(SpanKind.SERVER)
    assert {format(s.context.trace_id, "032x") for s in (bridge, client, stub)} == {TRACE_ID}
    assert bridge.parent is not None and format(bridge.parent.span_id, "016x") == PARENT_ID
    assert client.parent is not None and client.parent.span_id == bridge.context.span_id
    assert stub.parent is not None and stub.parent.span_id == client.context.span_id
    assert stub.parent.is_remote and bridge.parent.is_remote
    assert bridge.attributes is not None and stub.attributes is not None
    assert bridge.attributes["outcome"] == "completed" and bridge.attributes["tokens"] == 2
    assert bridge.attributes["first_token_ms"] == 12.5
    assert [e.name for e in bridge.events] == ["first_token"]
    assert stub.attributes["rpc.grpc.status_code"] == 0
    assert trace_id_of(span) == TRACE_ID
    # The bridge span outlived the gRPC call: it ended after the client span did.
    assert bridge.end_time is not None and client.end_time is not None and bridge.end_time >= client.end_time


@pytest.mark.parametrize("reader", ["async_for", "read"])
async def test_cancel_reaches_the_stub_and_ends_the_client_span(
    traced: tuple[Telemetry, Any, StreamEnds], collector: Collector, reader: str
) -> None:
    telemetry, stub, ends = traced
    span = telemetry.start_stream_span("stream", Context())
    with telemetry.activate(span):
        call = stream_chat(telemetry, stub, rag_pb2.StreamChatRequest(query="one two three", request_id=f"c-{reader}"))
    seen = 0
    if reader == "read":
        while seen < 3:
            response = await call.read()
            seen += response.HasField("token")
    else:
        async for response in call:
            seen += response.HasField("token")
            if seen == 3:
                break
    assert call.cancel()
    record = await ends.wait(f"c-{reader}")
    assert record["outcome"] == "cancelled"
    # Nobody reads the call any more, yet the client span ends, marked CANCELLED.
    await collector.wait_until(lambda spans: any(s.kind == SpanKind.CLIENT for s in spans))
    client = collector.one(SpanKind.CLIENT)
    assert client.status.status_code == StatusCode.ERROR
    assert client.attributes is not None
    assert client.attributes["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]
    await collector.wait_until(lambda spans: any(s.kind == SpanKind.SERVER for s in spans))
    assert collector.one(SpanKind.SERVER).attributes["rpc.grpc.status_code"] == 1  # type: ignore[index]
    telemetry.end_stream_span(span, StreamResult("s", f"c-{reader}", "cancelled", seen, 1.0, 1.0))


async def test_upstream_error_is_recorded_on_both_sides(collector: Collector) -> None:
    server, port = await start_server(
        StubConfig(mode="echo", fail_after=1),
        port=0,
        on_stream_end=StreamEnds(),
        interceptors=stub_interceptors(collector),
    )
    telemetry = Telemetry.from_environ({}, extra_processors=(collector,))
    try:
        async with channel_to(port, telemetry) as ch:
            call = stream_chat(telemetry, rag_stub(ch), rag_pb2.StreamChatRequest(query="a b c"))
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                async for _ in call:
                    pass
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
        await collector.wait_until(lambda spans: len(spans) >= 2)
    finally:
        await server.stop(None)
        telemetry.shutdown()
    for kind in (SpanKind.CLIENT, SpanKind.SERVER):
        span = collector.one(kind)
        assert span.status.status_code == StatusCode.ERROR
        assert span.attributes is not None and span.attributes["rpc.grpc.status_code"] == 14


async def test_spans_reach_a_real_otlp_receiver() -> None:
    with TraceReceiver() as receiver:
        env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}
        stub_interceptors = server_interceptors(env)
        server, port = await start_server(
            StubConfig(mode="echo"), port=0, on_stream_end=StreamEnds(), interceptors=stub_interceptors
        )
        telemetry = Telemetry.from_environ({**env, "OTEL_SERVICE_NAME": "bridge-under-test"})
        try:
            parent = telemetry.extract_context({"traceparent": TRACEPARENT})
            span = telemetry.start_stream_span("stream", parent)
            async with channel_to(port, telemetry) as ch:
                with telemetry.activate(span):
                    call = stream_chat(telemetry, rag_stub(ch), rag_pb2.StreamChatRequest(query="otlp"))
                async for _ in call:
                    pass
            telemetry.end_stream_span(span, StreamResult("s", "r", "completed", 1, 2.0, 1.0))
        finally:
            await server.stop(None)
            # Flushing blocks on the exporter's RPC, so it runs off the event loop.
            await asyncio.to_thread(telemetry.shutdown)
            await asyncio.to_thread(stub_interceptors[0].shutdown)
        spans = receiver.wait_for(3)
    assert {s.trace_id for s in spans} == {TRACE_ID}
    assert sorted(s.service_name for s in spans) == ["bridge-under-test", "bridge-under-test", "rag-stub"]
    by_kind = {(s.service_name, s.kind): s for s in spans}
    client = by_kind[("bridge-under-test", 3)]  # SPAN_KIND_CLIENT
    assert by_kind[("rag-stub", 2)].parent_span_id == client.span_id
    assert by_kind[("bridge-under-test", 2)].attributes["outcome"] == "completed"
