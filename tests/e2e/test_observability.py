"""OpenTelemetry, metrics, stream stats and logs end to end, against real stub and bridge processes.

Synchronisation is by conditions, never sleeps:
- the bridge (at LOG_LEVEL=INFO) writes one ``stream_end`` JSON line to stderr from the session's
  ``on_end``, after it has ended the span and fed metrics and stats; tests wait for that line;
- exported spans are awaited on the receiver's condition. Both services batch spans for 5 s (see
  ``test_bsp_schedule_delay_is_honoured``), so the trace tests stop the processes, whose shutdown
  flushes the batch, before waiting for the spans.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bridge.sse import Parser
from bridge.stream.session import GAP_BATCH
from tests.conftest import BridgeFactory, StubFactory
from tests.support.otlp_trace import (
    SPAN_KIND_CLIENT,
    SPAN_KIND_SERVER,
    STATUS_CODE_ERROR,
    FullSpan,
    TraceReceiver,
)
from tests.support.processes import Bridge, Process, Stub
from tests.support.sse_client import STREAM_PATH, open_stream

STREAM_METHOD = "/bali_zero.rag.v1.RagService/StreamChat"
GRPC_CANCELLED = 1
GRPC_UNAVAILABLE = 14


# --------------------------------------------------------------------------- helpers


def new_traceparent() -> tuple[str, str, str]:
    """(traceparent, trace id, parent span id) with fresh random ids."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


def otel_env(receiver: TraceReceiver, service: str) -> dict[str, str]:
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_SERVICE_NAME": service,
        # Standard SDK variable; the test for it shows it is not honoured yet.
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }


def json_lines(lines: list[str]) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for line in lines:
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                records.append(value)
    return records


def _wait_stream_end(bridge: Bridge, request_id: str, timeout: float) -> dict[str, Any]:
    """Block until the bridge's stderr has the ``stream_end`` line of ``request_id``."""
    found: list[dict[str, Any]] = []

    def check() -> bool:
        for record in json_lines(bridge.stderr_lines):
            if record.get("event") == "stream_end" and record.get("request_id") == request_id:
                found.append(record)
                return True
        return bridge.proc.poll() is not None

    with bridge._cond:
        bridge._cond.wait_for(check, timeout)
    if not found:
        raise AssertionError(f"no stream_end line for {request_id} within {timeout}s:\n{bridge.output()}")
    return found[0]


async def bridge_stream_end(bridge: Bridge, request_id: str, timeout: float = 10) -> dict[str, Any]:
    """The bridge's stream-end log record; once it exists, span, metrics and stats are final."""
    return await asyncio.to_thread(_wait_stream_end, bridge, request_id, timeout)


async def stop_all(*processes: Process) -> None:
    """SIGTERM and wait (off the event loop, all at once): an orderly exit flushes each span batch."""
    await asyncio.gather(*(asyncio.to_thread(process.stop) for process in processes))


def has_stream_trio(trace_id: str) -> Callable[[list[FullSpan]], bool]:
    """Bridge SERVER, bridge CLIENT and stub SERVER spans of one stream have all arrived."""

    def ready(spans: list[FullSpan]) -> bool:
        kinds = {(s.service_name, s.kind) for s in spans if s.trace_id == trace_id}
        return {
            ("bali-zero-bridge", SPAN_KIND_SERVER),
            ("bali-zero-bridge", SPAN_KIND_CLIENT),
            ("rag-stub", SPAN_KIND_SERVER),
        } <= kinds

    return ready


@dataclass(frozen=True)
class StreamTrace:
    bridge: FullSpan
    client: FullSpan
    stub: FullSpan


def stream_trace(spans: list[FullSpan], trace_id: str) -> StreamTrace:
    """The three spans of one stream, checked to form one parent → child chain."""

    def one(service: str, kind: int) -> FullSpan:
        found = [s for s in spans if s.trace_id == trace_id and s.service_name == service and s.kind == kind]
        assert len(found) == 1, found
        return found[0]

    bridge, client, stub = (
        one("bali-zero-bridge", SPAN_KIND_SERVER),
        one("bali-zero-bridge", SPAN_KIND_CLIENT),
        one("rag-stub", SPAN_KIND_SERVER),
    )
    assert client.parent_span_id == bridge.span_id
    assert stub.parent_span_id == client.span_id
    assert client.name == stub.name == STREAM_METHOD
    return StreamTrace(bridge, client, stub)


@dataclass
class TimedReply:
    status: int
    frames: list[dict[str, Any]]
    final_seen_ns: int  # wall clock (time.time_ns) when the chunk carrying done/error arrived


async def timed_stream(base_url: str, *, params: dict[str, str], headers: dict[str, str]) -> TimedReply:
    """Read a whole stream, noting when the final frame reached this client."""
    final_seen_ns = 0
    frames: list[dict[str, Any]] = []
    parser = Parser()
    async with (
        httpx.AsyncClient(base_url=base_url, timeout=30) as client,
        client.stream("GET", STREAM_PATH, params=params, headers=headers) as response,
    ):
        async for chunk in response.aiter_raw():
            arrived = time.time_ns()
            for event in parser.feed(chunk):
                if event.type != "message":
                    continue
                frame = json.loads(event.data)
                frames.append(frame)
                if frame["type"] in {"done", "error"}:
                    final_seen_ns = arrived
        return TimedReply(response.status_code, frames, final_seen_ns)


def metric_samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus exposition, keyed by (sample name, labels)."""
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def sample(samples: Mapping[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


# --------------------------------------------------------------------------- 1. one trace


@pytest.mark.parametrize("carrier", ["header", "query"])
async def test_one_trace_across_bridge_and_stub(
    stub_factory: StubFactory, bridge_factory: BridgeFactory, carrier: str
) -> None:
    traceparent, trace_id, parent_id = new_traceparent()
    request_id = new_request_id("trace")
    params = {"query": "one trace across two processes"}
    headers = {"x-request-id": request_id}
    if carrier == "header":
        headers["traceparent"] = traceparent
    else:  # EventSource cannot set headers
        params["traceparent"] = traceparent
    with TraceReceiver() as receiver:
        stub = stub_factory("--mode", "echo", env=otel_env(receiver, "rag-stub"))
        bridge = bridge_factory(stub, LOG_LEVEL="INFO", **otel_env(receiver, "bali-zero-bridge"))
        reply = await open_stream(bridge.url, params=params, headers=headers)
        assert reply.status == 200
        done = reply.frames[-1]
        assert done["type"] == "done"
        ended = await bridge_stream_end(bridge, request_id)
        await stop_all(bridge, stub)
        spans = receiver.wait_until(has_stream_trio(trace_id))

    chain = stream_trace(spans, trace_id)
    assert chain.bridge.parent_span_id == parent_id
    attributes = chain.bridge.attributes
    assert attributes["outcome"] == "completed"
    assert attributes["tokens"] == done["metrics"]["tokens"] == len(reply.tokens()) == 5
    assert attributes["first_token_ms"] == done["metrics"]["first_token_ms"]
    assert attributes["request_id"] == request_id
    (first_token,) = [e for e in chain.bridge.events if e.name == "first_token"]
    assert chain.bridge.start_time_unix_nano <= first_token.time_unix_nano <= chain.bridge.end_time_unix_nano
    assert chain.stub.attributes["rpc.grpc.status_code"] == 0  # the client span: see the xfail below
    # The log line of the same stream carries the same trace id (log ↔ trace correlation).
    assert ended["trace_id"] == trace_id
    # The bridge span covers the whole gRPC call.
    assert chain.bridge.end_time_unix_nano >= chain.client.end_time_unix_nano


async def test_completed_stream_client_span_is_ok(stub_factory: StubFactory, bridge_factory: BridgeFactory) -> None:
    traces = [new_traceparent() for _ in range(3)]
    with TraceReceiver() as receiver:
        stub = stub_factory("--mode", "echo", env=otel_env(receiver, "rag-stub"))
        bridge = bridge_factory(stub, LOG_LEVEL="INFO", **otel_env(receiver, "bali-zero-bridge"))
        for traceparent, _, _ in traces:
            request_id = new_request_id("ok")
            reply = await open_stream(
                bridge.url,
                params={"query": "a complete answer"},
                headers={"traceparent": traceparent, "x-request-id": request_id},
            )
            assert reply.frames[-1]["type"] == "done"
            assert (await stub.ended(request_id))["outcome"] == "completed"
            await bridge_stream_end(bridge, request_id)
        await stop_all(bridge, stub)
        spans = receiver.wait_until(lambda got: all(has_stream_trio(t)(got) for _, t, _ in traces))
    chains = [stream_trace(spans, trace_id) for _, trace_id, _ in traces]
    assert all(c.stub.attributes["rpc.grpc.status_code"] == 0 for c in chains)
    client_status = [(c.client.attributes["rpc.grpc.status_code"], c.client.status_message) for c in chains]
    assert client_status == [(0, "")] * len(chains)


async def traced_timed_stream(
    stub_factory: StubFactory, bridge_factory: BridgeFactory, query: str, *stub_args: str
) -> tuple[TimedReply, StreamTrace]:
    """One completed traced stream through an echo stub started with ``stub_args``: the client's
    timed reply and the trace of the stream. Spans are awaited before the processes stop, so a
    call still waiting for its status is not cut short by the shutdown."""
    traceparent, trace_id, _ = new_traceparent()
    request_id = new_request_id("timed")
    with TraceReceiver() as receiver:
        stub = stub_factory("--mode", "echo", *stub_args, env=otel_env(receiver, "rag-stub"))
        bridge = bridge_factory(stub, LOG_LEVEL="INFO", **otel_env(receiver, "bali-zero-bridge"))
        reply = await timed_stream(
            bridge.url, params={"query": query}, headers={"traceparent": traceparent, "x-request-id": request_id}
        )
        assert reply.status == 200 and reply.frames[-1]["type"] == "done" and reply.final_seen_ns
        await bridge_stream_end(bridge, request_id)
        spans = receiver.wait_until(has_stream_trio(trace_id))
        await stop_all(bridge, stub)
    return reply, stream_trace(spans, trace_id)


async def test_bridge_span_ends_after_the_client_saw_done(
    stub_factory: StubFactory, bridge_factory: BridgeFactory
) -> None:
    reply, chain = await traced_timed_stream(stub_factory, bridge_factory, "when does the span end")
    # The span ends once the final frame was handed to the socket; the client reads it a moment
    # later, so allow loopback delivery latency on a loaded 2-core machine. A span ended at upstream
    # completion (the ASGI pitfall) ends before the frame is even written and fails this.
    delivery_slack_ns = 3_000_000
    assert chain.bridge.end_time_unix_nano >= reply.final_seen_ns - delivery_slack_ns, (
        f"span ended {(reply.final_seen_ns - chain.bridge.end_time_unix_nano) / 1e6:.3f} ms "
        "before the client saw the done frame"
    )


async def test_late_trailers_keep_the_client_span_inside_the_stream_span(
    stub_factory: StubFactory, bridge_factory: BridgeFactory
) -> None:
    """The RAG server's OK status arrives 300 ms after its completion message: ``done`` goes out
    at once, and the stream span still ends after the gRPC client span (it ended at ``done``
    before, ~300 ms before its own child)."""
    status_delay_ms = 300
    reply, chain = await traced_timed_stream(
        stub_factory, bridge_factory, "trailers come late", "--status-delay-ms", str(status_delay_ms)
    )
    assert chain.client.attributes["rpc.grpc.status_code"] == 0
    assert chain.bridge.end_time_unix_nano >= chain.client.end_time_unix_nano
    # ``done`` did not wait for the status: the client saw it well before the call ended.
    assert chain.client.end_time_unix_nano - reply.final_seen_ns > status_delay_ms * 1_000_000 // 2


# --------------------------------------------------------------------------- 2. cancelled


async def test_cancelled_stream_span_outcome(stub_factory: StubFactory, bridge_factory: BridgeFactory) -> None:
    traceparent, trace_id, parent_id = new_traceparent()
    request_id = new_request_id("cancel")
    with TraceReceiver() as receiver:
        stub = stub_factory(
            "--mode", "echo", "--token-delay-ms", "40", "--repeat", "100", env=otel_env(receiver, "rag-stub")
        )
        bridge = bridge_factory(stub, LOG_LEVEL="INFO", **otel_env(receiver, "bali-zero-bridge"))
        reply = await open_stream(
            bridge.url,
            params={"query": "tick tock tick tock"},
            headers={"traceparent": traceparent, "x-request-id": request_id},
            stop_after_tokens=3,
        )
        assert reply.status == 200 and len(reply.tokens()) == 3  # the client hung up mid-stream
        ended = await bridge_stream_end(bridge, request_id)
        assert ended["outcome"] == "cancelled"
        upstream = await stub.ended(request_id)
        assert upstream["outcome"] == "cancelled"
        await stop_all(bridge, stub)
        spans = receiver.wait_until(has_stream_trio(trace_id))

    chain = stream_trace(spans, trace_id)
    assert chain.bridge.parent_span_id == parent_id
    assert chain.bridge.attributes["outcome"] == "cancelled"
    assert chain.bridge.attributes["tokens"] == ended["tokens"] >= 3
    assert "error.code" not in chain.bridge.attributes
    assert chain.bridge.status_code != STATUS_CODE_ERROR  # a client hanging up is not a server error
    assert [e.name for e in chain.bridge.events] == ["first_token"]
    assert chain.client.attributes["rpc.grpc.status_code"] == GRPC_CANCELLED
    assert chain.stub.attributes["rpc.grpc.status_code"] == GRPC_CANCELLED


# --------------------------------------------------------------------------- 3. error


async def test_error_stream_span_outcome_and_status(stub_factory: StubFactory, bridge_factory: BridgeFactory) -> None:
    traceparent, trace_id, parent_id = new_traceparent()
    request_id = new_request_id("error")
    with TraceReceiver() as receiver:
        stub = stub_factory("--mode", "echo", "--fail-after", "2", env=otel_env(receiver, "rag-stub"))
        bridge = bridge_factory(stub, LOG_LEVEL="INFO", **otel_env(receiver, "bali-zero-bridge"))
        reply = await open_stream(
            bridge.url,
            params={"query": "this stream will fail after two tokens"},
            headers={"traceparent": traceparent, "x-request-id": request_id},
        )
        assert reply.status == 200 and len(reply.tokens()) == 2
        error = reply.frames[-1]
        assert error["type"] == "error" and error["code"] == "UPSTREAM_UNAVAILABLE"
        await bridge_stream_end(bridge, request_id)
        await stop_all(bridge, stub)
        spans = receiver.wait_until(has_stream_trio(trace_id))

    chain = stream_trace(spans, trace_id)
    assert chain.bridge.parent_span_id == parent_id
    assert chain.bridge.attributes["outcome"] == "error"
    assert chain.bridge.attributes["error.code"] == "UPSTREAM_UNAVAILABLE"
    assert chain.bridge.attributes["tokens"] == 2
    assert chain.bridge.status_code == STATUS_CODE_ERROR
    assert chain.client.status_code == STATUS_CODE_ERROR
    assert chain.client.attributes["rpc.grpc.status_code"] == GRPC_UNAVAILABLE
    assert chain.stub.status_code == STATUS_CODE_ERROR
    assert chain.stub.attributes["rpc.grpc.status_code"] == GRPC_UNAVAILABLE


# --------------------------------------------------------------------------- BSP variables


async def test_bsp_schedule_delay_is_honoured(stub_factory: StubFactory, bridge_factory: BridgeFactory) -> None:
    """With OTEL_BSP_SCHEDULE_DELAY=100, spans are exported within ~0.1 s, not at the next 5 s tick.

    Deterministic either way: stream 2 starts right after the later of the two services' batch
    workers exported stream 1, so with the hard-coded 5 s that worker's next export is 5 s away,
    far beyond the 1.5 s asked; with the variable honoured both export within ~0.1 s.
    """
    with TraceReceiver() as receiver:
        stub = stub_factory("--mode", "echo", env=otel_env(receiver, "rag-stub"))
        bridge = bridge_factory(stub, LOG_LEVEL="INFO", **otel_env(receiver, "bali-zero-bridge"))
        try:
            first_parent, first_trace, _ = new_traceparent()
            await open_stream(bridge.url, params={"query": "first"}, headers={"traceparent": first_parent})
            # Whatever the delay, the first batch arrives within one 5 s period (plus slack).
            await asyncio.to_thread(receiver.wait_until, has_stream_trio(first_trace), 12)
            second_parent, second_trace, _ = new_traceparent()
            await open_stream(bridge.url, params={"query": "second"}, headers={"traceparent": second_parent})
            await asyncio.to_thread(receiver.wait_until, has_stream_trio(second_trace), 1.5)
        finally:
            await stop_all(bridge, stub)


# --------------------------------------------------------------------------- 4./5. metrics and stats


@dataclass
class Mix:
    bridge: Bridge
    stub: Stub
    completed: int
    ends: list[dict[str, Any]]  # the bridge's stream_end records, one per stream

    @property
    def tokens(self) -> int:
        return sum(int(e["tokens"]) for e in self.ends)

    @property
    def with_tokens(self) -> int:
        return sum(1 for e in self.ends if e["tokens"] > 0)


async def run_mix(stub_factory: StubFactory, bridge_factory: BridgeFactory, completed: int = 3) -> Mix:
    """``completed`` completed streams, one failed (UNAVAILABLE after 8 tokens), one cancelled."""
    stub = stub_factory("--mode", "echo", "--token-delay-ms", "40", "--fail-after", "8")
    bridge = bridge_factory(stub, LOG_LEVEL="INFO", RATE_LIMIT="1000/minute")
    long_query = " ".join(f"w{i}" for i in range(20))
    ends: list[dict[str, Any]] = []
    for i in range(completed):
        rid = new_request_id(f"ok{i}")
        reply = await open_stream(bridge.url, params={"query": "alpha beta gamma"}, headers={"x-request-id": rid})
        assert reply.frames[-1]["type"] == "done" and len(reply.tokens()) == 3
        ends.append(await bridge_stream_end(bridge, rid))
    rid = new_request_id("fail")
    reply = await open_stream(bridge.url, params={"query": long_query}, headers={"x-request-id": rid})
    assert reply.frames[-1]["type"] == "error" and len(reply.tokens()) == 8
    ends.append(await bridge_stream_end(bridge, rid))
    rid = new_request_id("cancel")
    # 40 ms between tokens: the bridge sees the hang-up long before the 8th token would fail it.
    reply = await open_stream(
        bridge.url, params={"query": long_query}, headers={"x-request-id": rid}, stop_after_tokens=1
    )
    assert len(reply.tokens()) == 1
    ends.append(await bridge_stream_end(bridge, rid))
    assert [e["outcome"] for e in ends] == ["completed"] * completed + ["error", "cancelled"]
    return Mix(bridge, stub, completed, ends)


async def test_metrics_after_completed_failed_and_cancelled_streams(
    stub_factory: StubFactory, bridge_factory: BridgeFactory
) -> None:
    mix = await run_mix(stub_factory, bridge_factory)
    async with httpx.AsyncClient(base_url=mix.bridge.url) as client:
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = metric_samples(response.text)  # parses, or raises

    streams = mix.completed + 2
    assert mix.with_tokens == streams  # every stream here got at least one token
    assert sample(samples, "bridge_first_token_seconds_count") == mix.with_tokens
    assert sample(samples, "bridge_streams_total", outcome="completed", error_code="") == mix.completed
    assert sample(samples, "bridge_streams_total", outcome="error", error_code="UPSTREAM_UNAVAILABLE") == 1
    assert sample(samples, "bridge_streams_total", outcome="cancelled", error_code="") == 1
    assert sum(v for (name, _), v in samples.items() if name == "bridge_streams_total") == streams
    for outcome, count in (("completed", mix.completed), ("error", 1), ("cancelled", 1)):
        assert sample(samples, "bridge_stream_duration_seconds_count", outcome=outcome) == count
    assert sample(samples, "bridge_tokens_total") == mix.tokens == 3 * mix.completed + 8 + mix.ends[-1]["tokens"]
    assert sample(samples, "bridge_inter_token_seconds_count") == mix.tokens - mix.with_tokens
    assert sample(samples, "bridge_open_streams") == 0
    # Histogram buckets are cumulative and end in +Inf == count.
    inf = sample(samples, "bridge_first_token_seconds_bucket", le="+Inf")
    assert inf == sample(samples, "bridge_first_token_seconds_count")


async def test_stream_stats_after_completed_failed_and_cancelled_streams(
    stub_factory: StubFactory, bridge_factory: BridgeFactory
) -> None:
    mix = await run_mix(stub_factory, bridge_factory)
    async with httpx.AsyncClient(base_url=mix.bridge.url) as client:
        response = await client.get("/api/v2/bali-zero/stream-stats")
    assert response.status_code == 200
    stats = response.json()
    streams = mix.completed + 2
    assert stats["outcomes"] == {"completed": mix.completed, "cancelled": 1, "error": 1}
    assert stats["error_codes"] == {"UPSTREAM_UNAVAILABLE": 1}
    assert stats["streams_opened"] == streams
    assert stats["open_streams"] == 0
    assert stats["first_token_ms"]["count"] == mix.with_tokens
    assert stats["inter_token_ms"]["count"] == mix.tokens - mix.with_tokens
    for key in ("first_token_ms", "inter_token_ms"):
        p50, p95, p99 = (stats[key][p] for p in ("p50", "p95", "p99"))
        assert all(isinstance(p, int | float) for p in (p50, p95, p99)), stats[key]
        assert 0 <= p50 <= p95 <= p99
    # The stub paces tokens 40 ms apart: the median gap reflects it (ms, not seconds).
    assert 20 <= stats["inter_token_ms"]["p50"] <= 1000


async def test_inter_token_gaps_reach_stats_and_metrics_while_a_stream_runs(
    stub_factory: StubFactory, bridge_factory: BridgeFactory
) -> None:
    """Gaps are handed over GAP_BATCH at a time: a long answer shows up before it ends."""
    stub = stub_factory("--mode", "echo", "--token-delay-ms", "5")
    bridge = bridge_factory(stub, RATE_LIMIT="1000/minute")
    query = " ".join(f"w{i}" for i in range(GAP_BATCH * 4))
    async with (
        httpx.AsyncClient(base_url=bridge.url, timeout=30) as client,
        client.stream("GET", STREAM_PATH, params={"query": query}) as response,
    ):
        # Iterated by hand: leaving an ``async for`` would close the generator, and with it the
        # stream, whose end flushes the rest of the gaps.
        chunks = response.aiter_raw()
        parser, tokens = Parser(), 0
        while tokens < GAP_BATCH + 1:  # GAP_BATCH gaps: one batch is due
            events = parser.feed(await anext(chunks))
            tokens += sum(1 for e in events if e.type == "message" and '"token"' in e.data)
        stats = (await client.get("/api/v2/bali-zero/stream-stats")).json()
        metrics = metric_samples((await client.get("/metrics")).text)
    assert stats["open_streams"] == 1  # still running: the gaps were not held back to the end
    assert GAP_BATCH <= stats["inter_token_ms"]["count"] < GAP_BATCH * 4 - 1
    assert sample(metrics, "bridge_inter_token_seconds_count") == stats["inter_token_ms"]["count"]


# --------------------------------------------------------------------------- 6. logs


def files_under(root: Path) -> Iterator[Path]:
    return (p for p in root.rglob("*") if p.is_file())


async def test_logs_one_line_per_stream_end_and_no_query_text(
    stub_factory: StubFactory, bridge_factory: BridgeFactory, tmp_path: Path
) -> None:
    marker = f"Qmarker{secrets.token_hex(8)}"  # alphanumeric: identical URL-encoded, JSON-escaped
    combined, errors = tmp_path / "logs" / "combined.log", tmp_path / "logs" / "error.log"
    stub = stub_factory("--mode", "echo", "--fail-after", "3")
    bridge = bridge_factory(stub, LOG_LEVEL="INFO", LOG_FILE=str(combined), ERROR_LOG_FILE=str(errors))
    traceparent, trace_id, _ = new_traceparent()
    ok_id, fail_id = new_request_id("logok"), new_request_id("logfail")

    ok = await open_stream(
        bridge.url, params={"query": f"{marker} fine"}, headers={"x-request-id": ok_id, "traceparent": traceparent}
    )
    assert ok.frames[-1]["type"] == "done"
    failed = await open_stream(
        bridge.url,
        method="POST",
        json_body={"query": f"{marker} will fail soon enough"},
        headers={"x-request-id": fail_id},
    )
    assert failed.frames[-1]["type"] == "error"
    await bridge_stream_end(bridge, ok_id)
    await bridge_stream_end(bridge, fail_id)
    await stop_all(bridge, stub)  # flush and close every file the run writes

    lines = combined.read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    ends = [r for r in records if r.get("event") == "stream_end"]
    assert sorted(r["request_id"] for r in ends) == sorted([ok_id, fail_id])
    by_id = {r["request_id"]: r for r in ends}
    assert by_id[ok_id]["trace_id"] == trace_id
    assert by_id[ok_id]["outcome"] == "completed" and by_id[ok_id]["level"] == "INFO"
    assert by_id[fail_id]["outcome"] == "error" and by_id[fail_id]["error_code"] == "UPSTREAM_UNAVAILABLE"
    assert "trace_id" in by_id[fail_id]  # None here: no traceparent and tracing off
    for record in ends:
        assert isinstance(record["duration_ms"], float | int) and record["duration_ms"] >= 0
        assert isinstance(record["first_token_ms"], float | int)
        assert record["tokens"] == (2 if record is by_id[ok_id] else 3)
        assert {"ts", "level", "logger", "stream_id"} <= set(record)

    assert errors.exists()
    error_records = [json.loads(line) for line in errors.read_text(encoding="utf-8").splitlines()]
    assert all(r["level"] in {"ERROR", "CRITICAL"} for r in error_records), error_records

    produced = list(files_under(tmp_path))
    assert combined in produced and errors in produced
    leaks = [str(p) for p in produced if marker.encode() in p.read_bytes()]
    streams = {
        "bridge stdout": bridge.lines,
        "bridge stderr": bridge.stderr_lines,
        "stub stdout": stub.lines,
        "stub stderr": stub.stderr_lines,
    }
    leaks += [name for name, text in streams.items() if any(marker in line for line in text)]
    assert not leaks, f"the query text was written to: {leaks}"
    assert stub.stream_ends(), "the stub's stdout was captured"


# --------------------------------------------------------------------------- 7. tracing off


async def _stream_without_tracing(stub: Stub, bridge: Bridge) -> None:
    traceparent, trace_id, _ = new_traceparent()
    request_id = new_request_id("off")
    reply = await open_stream(
        bridge.url,
        params={"query": "no tracing here"},
        headers={"traceparent": traceparent, "x-request-id": request_id},
    )
    assert reply.status == 200 and reply.frames[-1]["type"] == "done"
    ended = await bridge_stream_end(bridge, request_id)
    assert ended["outcome"] == "completed"
    assert ended["trace_id"] == trace_id  # the caller's id still reaches the logs
    await stop_all(bridge, stub)  # an exporter, had there been one, would flush here


async def test_tracing_off_by_exporter_none_exports_nothing(
    stub_factory: StubFactory, bridge_factory: BridgeFactory
) -> None:
    """OTEL_TRACES_EXPORTER=none wins even over an OTLP endpoint that would otherwise turn it on."""
    with TraceReceiver() as receiver:
        env = {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}
        stub = stub_factory("--mode", "echo", env=env)
        bridge = bridge_factory(stub, LOG_LEVEL="INFO", **env)
        await _stream_without_tracing(stub, bridge)
        assert receiver.requests == 0 and receiver.spans == []


async def test_tracing_off_by_default_exports_nothing_to_the_sdk_default_endpoint(
    stub_factory: StubFactory, bridge_factory: BridgeFactory
) -> None:
    """No OTEL_* at all (the SDK's own default would be otlp to localhost:4317): nothing is sent there."""
    try:
        receiver = TraceReceiver("localhost:4317")
    except RuntimeError:
        pytest.skip("localhost:4317 is in use")
    with receiver:
        # base_env sets OTEL_TRACES_EXPORTER=none; empty is the same as unset for the bridge's reading.
        env = {"OTEL_TRACES_EXPORTER": ""}
        stub = stub_factory("--mode", "echo", env=env)
        bridge = bridge_factory(stub, LOG_LEVEL="INFO", **env)
        await _stream_without_tracing(stub, bridge)
        assert receiver.requests == 0 and receiver.spans == []
