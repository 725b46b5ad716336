"""The stub's RagService: deterministic answers, pacing, failures and a record of every stream end."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from bali_zero.rag.v1 import rag_pb2, rag_pb2_grpc
from rag_stub.corpus import Retriever, compose_answer, load_corpus
from rag_stub.pacing import Ticker
from rag_stub.tokens import split_echo, split_words

Outcome = Literal["completed", "cancelled", "deadline_exceeded", "failed"]
StreamEndSink = Callable[[dict[str, Any]], None]

MODEL_NAME = "bali-zero-stub-1"
SERVICE_NAME = rag_pb2.DESCRIPTOR.services_by_name["RagService"].full_name


@dataclass(frozen=True, slots=True)
class StubConfig:
    mode: Literal["rag", "echo"] = "rag"
    first_token_delay_ms: float = 0.0
    token_delay_ms: float = 0.0
    fail_after: int | None = None
    status_delay_ms: float = 0.0  # between the completion message and the OK status (trailers)
    repeat: int = 1
    echo_delimiter: str | None = None
    max_query_bytes: int = 8 * 1024
    max_history: int = 50
    min_ping_interval_s: float = 300.0  # see keepalive_policy


def keepalive_policy(min_ping_interval_s: float) -> list[tuple[str, int]]:
    """The server's rule for its clients' keepalive pings, spelled out (gRPC's defaults at 300 s).

    A ping arriving less than ``min_ping_interval_s`` after the previous one, while the server
    sent no data, is a strike; the third strike gets GOAWAY ENHANCE_YOUR_CALM "too_many_pings" and
    the connection is closed, failing its calls with UNAVAILABLE. On a connection without calls
    only one ping per two hours is allowed. A RAG service behind the bridge needs
    ``min_ping_interval_s`` no higher than the bridge's UPSTREAM_KEEPALIVE_S.
    """
    return [
        ("grpc.http2.min_ping_interval_without_data_ms", round(min_ping_interval_s * 1000)),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.keepalive_permit_without_calls", 0),
    ]


def print_stream_end(record: dict[str, Any]) -> None:
    """The contract's one JSON line per ended stream, flushed so a reader sees it at once."""
    sys.stdout.write(json.dumps(record, separators=(",", ":")) + "\n")
    sys.stdout.flush()


class _Invalid(Exception):
    def __init__(self, violations: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{f}: {d}" for f, d in violations))
        self.violations = violations


def _validate(query: str, history: Any, config: StubConfig) -> None:
    problems: list[tuple[str, str]] = []
    if not query.strip():
        problems.append(("query", "must not be empty"))
    elif len(query.encode()) > config.max_query_bytes:
        problems.append(("query", f"must be at most {config.max_query_bytes} bytes"))
    if len(history) > config.max_history:
        problems.append(("conversation_history", f"at most {config.max_history} messages"))
    for i, message in enumerate(history):
        if message.role == rag_pb2.CHAT_ROLE_UNSPECIFIED:
            problems.append((f"conversation_history[{i}].role", "must be set"))
        if not message.content:
            problems.append((f"conversation_history[{i}].content", "must not be empty"))
    if problems:
        raise _Invalid(problems)


def _invalid_status(error: _Invalid) -> grpc.Status:
    detail = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in error.violations
        ]
    )
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=str(error))
    status.details.add().Pack(detail)
    return rpc_status.to_status(status)


def _ended_by_caller(context: grpc.aio.ServicerContext[Any, Any]) -> Outcome:
    remaining = context.time_remaining()
    return "deadline_exceeded" if remaining is not None and remaining <= 0.001 else "cancelled"


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


class RagStub(rag_pb2_grpc.RagServiceServicer):
    def __init__(self, config: StubConfig, on_stream_end: StreamEndSink = print_stream_end) -> None:
        self.config = config
        self.on_stream_end = on_stream_end
        self.retriever = Retriever(load_corpus())
        self.ticker = Ticker(config.token_delay_ms / 1000) if config.token_delay_ms > 0 else None

    def _plan(self, query: str) -> tuple[rag_pb2.Metadata, list[str]]:
        if self.config.mode == "echo":
            return rag_pb2.Metadata(model="echo"), split_echo(query, self.config.echo_delimiter) * self.config.repeat
        hits = self.retriever.search(query)
        sources = [rag_pb2.Source(title=d.title, uri=d.uri, score=s) for d, s in hits]
        return rag_pb2.Metadata(sources=sources, model=MODEL_NAME), split_words(compose_answer(query, hits))

    async def _accept(
        self, request: rag_pb2.StreamChatRequest | rag_pb2.ChatRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tuple[str, rag_pb2.Metadata, list[str]]:
        """Validate (aborting with INVALID_ARGUMENT and BadRequest details) and plan the answer."""
        request_id = request.request_id or uuid.uuid4().hex
        try:
            _validate(request.query, request.conversation_history, self.config)
        except _Invalid as exc:
            await context.abort_with_status(_invalid_status(exc))
        metadata, tokens = self._plan(request.query)
        metadata.request_id = request_id
        return request_id, metadata, tokens

    async def StreamChat(self, request: rag_pb2.StreamChatRequest, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        started = time.monotonic()
        request_id, metadata, tokens = await self._accept(request, context)
        # Accepting the call sends headers at once, so a caller can tell "accepted, thinking"
        # from "unreachable" before the first token.
        await context.send_initial_metadata((("x-request-id", request_id),))
        sent = 0
        outcome: Outcome = "failed"
        first_token_at: float | None = None
        try:
            await context.write(rag_pb2.StreamChatResponse(metadata=metadata))
            if self.config.first_token_delay_ms > 0:
                await asyncio.sleep(self.config.first_token_delay_ms / 1000)
            deadline: float | None = None
            for index, text in enumerate(tokens):
                if self.config.fail_after is not None and sent >= self.config.fail_after:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"stub failure after {sent} tokens")
                if index and self.ticker is not None:
                    deadline = await self.ticker.wait(deadline)
                await context.write(rag_pb2.StreamChatResponse(token=rag_pb2.Token(index=index, text=text)))
                sent += 1
                if first_token_at is None:
                    first_token_at = time.monotonic()
            now = time.monotonic()
            completion = rag_pb2.Completion(
                finish_reason=rag_pb2.FINISH_REASON_STOP,
                token_count=sent,
                time_to_first_token=_duration((first_token_at or now) - started),
                total_time=_duration(now - started),
            )
            await context.write(rag_pb2.StreamChatResponse(completion=completion))
            outcome = "completed"
            if self.config.status_delay_ms > 0:
                await asyncio.sleep(self.config.status_delay_ms / 1000)
        except asyncio.CancelledError:
            outcome = _ended_by_caller(context)
            raise
        except Exception as exc:
            # A write that was blocked by flow control when the caller cancelled fails with
            # ExecuteBatchError instead of being cancelled; the call is gone either way.
            if type(exc).__name__ == "ExecuteBatchError" or context.cancelled():
                outcome = _ended_by_caller(context)
            raise
        finally:
            self.on_stream_end(
                {
                    "event": "stream_end",
                    "request_id": request_id,
                    "outcome": outcome,
                    "tokens_sent": sent,
                    "ended_at": time.time(),
                }
            )

    async def Chat(
        self, request: rag_pb2.ChatRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> rag_pb2.ChatResponse:
        started = time.monotonic()
        _, metadata, tokens = await self._accept(request, context)
        if self.config.first_token_delay_ms > 0:
            await asyncio.sleep(self.config.first_token_delay_ms / 1000)
        if self.config.fail_after is not None and self.config.fail_after < len(tokens):
            await context.abort(grpc.StatusCode.UNAVAILABLE, "stub failure")
        elapsed = time.monotonic() - started
        completion = rag_pb2.Completion(
            finish_reason=rag_pb2.FINISH_REASON_STOP,
            token_count=len(tokens),
            time_to_first_token=_duration(elapsed),
            total_time=_duration(elapsed),
        )
        return rag_pb2.ChatResponse(answer="".join(tokens), metadata=metadata, completion=completion)


async def start_server(
    config: StubConfig,
    host: str = "127.0.0.1",
    port: int = 50051,
    on_stream_end: StreamEndSink = print_stream_end,
    interceptors: list[grpc.aio.ServerInterceptor] | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Start the stub with health checking and reflection; return the server and its bound port."""
    # grpc turns SO_REUSEPORT on by default: a second stub on a taken port would print "listening"
    # and silently share the port (and its callers) with the first one.
    server = grpc.aio.server(
        interceptors=interceptors or None,
        options=[("grpc.so_reuseport", 0), *keepalive_policy(config.min_ping_interval_s)],
    )
    rag_pb2_grpc.add_RagServiceServicer_to_server(RagStub(config, on_stream_end), server)  # type: ignore[no-untyped-call]
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:  # grpcio >= 1.55 raises instead of returning 0
        bound = 0
    if bound == 0:
        raise OSError(f"cannot listen on {address}: the address is in use or not available here")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound
