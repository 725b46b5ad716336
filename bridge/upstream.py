"""The gRPC client side: one shared ``grpc.aio`` channel to the RAG service.

The channel is created in the app's lifespan, inside the server's event loop: a channel made at
import time is bound to another loop and fails with "attached to a different loop".

``Upstream`` is the only place that calls the RAG service, so the deadline
(UPSTREAM_TIMEOUT_S), the ``x-request-id`` metadata and the retry rule are written once:

    A streaming call that fails with UNAVAILABLE before its first token is opened again, once
    (a replica was down or died after accepting; round robin picks another). Never after a
    token: the client would see it twice.

The request messages are built here too (``stream_chat_request``, ``chat_request``), from a
validated input and the caller's identity: a verified email wins over the one in the body.
"""

from __future__ import annotations

import contextvars
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bali_zero.rag.v1 import rag_pb2, rag_pb2_grpc
from bridge.auth import effective_role
from bridge.errors import from_grpc_status
from bridge.inputs import ChatInput
from bridge.telemetry import StreamTracing
from bridge.types import Identity

SERVICE_NAME: str = rag_pb2.DESCRIPTOR.services_by_name["RagService"].full_name
STREAM_METHOD = f"/{SERVICE_NAME}/StreamChat"


class StreamCall(Protocol):
    """The parts of grpc.aio's UnaryStreamCall the bridge uses (grpcio ships no type hints)."""

    async def read(self) -> Any: ...

    def cancel(self) -> bool: ...

    def cancelled(self) -> bool: ...

    async def code(self) -> grpc.StatusCode: ...


def channel_target(rag_target: str) -> str:
    """``host:port``, ``dns:///name:port`` or a comma list ``h1:p1,h2:p2`` (→ ``ipv4:`` URI)."""
    target = rag_target.strip()
    if "," in target and "://" not in target and not target.startswith(("ipv4:", "ipv6:")):
        return "ipv4:" + ",".join(part.strip() for part in target.split(",") if part.strip())
    return target


KEEPALIVE_ACK_TIMEOUT_MS = 10_000
"""How long a keepalive ping may go unanswered; also the TCP_USER_TIMEOUT gRPC sets on the socket
once keepalive is on, so a request written to a dead connection fails after this long."""


def keepalive_options(keepalive_s: float) -> list[tuple[str, Any]]:
    """Pings that a gRPC server with the default policy accepts: one per ``keepalive_s`` at most.

    A gRPC C-core server counts a "ping strike" for every ping arriving sooner than
    ``grpc.http2.min_ping_interval_without_data_ms`` (default 5 minutes) after the previous one
    while it sent no data, and answers the third strike with GOAWAY ENHANCE_YOUR_CALM
    "too_many_pings": the connection is dropped and every call on it fails with UNAVAILABLE. The
    bridge always has a call open on each connection (the grpc.health.v1 Watch of
    ``healthCheckConfig``, which sends nothing while the health does not change), so a client
    pinging more often than that minimum is cut off every few pings, and so is a stream whose first
    token takes a few pings to come. ``keepalive_s`` must be at least the server's minimum
    (UPSTREAM_KEEPALIVE_S's default is above gRPC's default with a margin for timer skew).

    No pings without a call (a default server allows one per two hours then); no cap on pings
    without data (the Watch never sends any, and a capped client stops pinging altogether).
    """
    return [
        ("grpc.keepalive_time_ms", round(keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_ACK_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def channel_options(
    rag_target: str, ejection_interval_s: float = 10.0, keepalive_s: float = 330.0
) -> list[tuple[str, Any]]:
    """Round robin over every resolved address, each checked with grpc.health.v1 before use.

    Round robin alone keeps sending half the traffic to a replica that answers its health check
    but fails every call; grpcio's outlier detection ejects such a replica for a while. It counts
    every non-OK status (CANCELLED from departing browsers too), hence the high threshold and the
    50 % cap on ejected replicas. There is no circuit breaker outside xDS in grpcio; MAX_STREAMS_TOTAL
    is the bridge's own load shedding.
    """
    interval = f"{ejection_interval_s:g}s"
    outlier_detection = {
        "interval": interval,
        "baseEjectionTime": "30s",
        "maxEjectionPercent": 50,
        "failurePercentageEjection": {
            "threshold": 50,
            "enforcementPercentage": 100,
            "minimumHosts": 2,
            "requestVolume": 10,
        },
        "childPolicy": [{"round_robin": {}}],
    }
    service_config = {
        "loadBalancingConfig": [{"outlier_detection_experimental": outlier_detection}],
        "healthCheckConfig": {"serviceName": SERVICE_NAME},
    }
    return [
        ("grpc.service_config", json.dumps(service_config)),
        # The bridge retries once before the first token itself (it knows whether tokens were sent).
        ("grpc.enable_retries", 0),
        # A restarted replica is picked up within about a second instead of minutes of backoff.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
        *keepalive_options(keepalive_s),
        # Without a growing receive window a stalled browser stalls the RAG server instead of
        # filling the bridge's memory (back-pressure reaches the producer).
        ("grpc.http2.bdp_probe", 0),
        ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    ]


class ChatStream:
    """One streaming chat as the pump reads it: the current gRPC call, replaced under the retry rule.

    ``open_call`` makes a new call in the context the stream was opened in (so a retry's client
    span has the same parent as the first call's).
    """

    __slots__ = ("_call", "_cancelled", "_open_call", "_read_retried", "request_id")

    def __init__(self, open_call: Callable[[], StreamCall], request_id: str = "") -> None:
        self.request_id = request_id  # logged with the upstream's status details on a failure
        self._open_call = open_call
        self._call = open_call()
        self._read_retried = False
        self._cancelled = False

    def read(self) -> Awaitable[Any]:
        """The next message, or ``grpc.aio.EOF``; raises ``grpc.aio.AioRpcError`` when the call fails
        (then ask ``reopen_after``). The call's own read, not a wrapper: one coroutine per token."""
        return self._call.read()

    def reopen_after(self, error: grpc.aio.AioRpcError, *, token_sent: bool) -> bool:
        """The retry rule while reading: True when ``error`` allowed a new call, now in place.

        UNAVAILABLE before any token reached the client, once, and never once cancelled (the
        stream ended here; a retry would reopen what the client asked to stop).
        """
        if error.code() != grpc.StatusCode.UNAVAILABLE or token_sent or self._read_retried or self._cancelled:
            return False
        self._call.cancel()
        self._read_retried = True
        self._call = self._open_call()
        return True

    def cancel(self) -> bool:
        """Cancel the current call; no retry replaces it afterwards (a stream ended here)."""
        self._cancelled = True
        return self._call.cancel()

    def cancelled(self) -> bool:
        return self._call.cancelled()

    async def closed(self) -> None:
        """Wait for the current call's status (its trailers) without cancelling anything.

        Safe to cancel: it awaits the call's status waiter, not a pending gRPC batch.
        """
        await self._call.code()


class Upstream:
    """The RAG service as the bridge sees it: streaming and unary chat plus its health."""

    def __init__(
        self,
        rag_target: str,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
        ejection_interval_s: float = 10.0,
        *,
        timeout_s: float = 120.0,
        keepalive_s: float = 330.0,
        stream_tracing: StreamTracing | None = None,
    ) -> None:
        """``interceptors`` apply to unary calls only in practice: pass no unary-stream interceptor
        here, trace streams with ``stream_tracing`` (an intercepted stream cancelled mid-read leaks
        native memory in grpcio, see ``bridge.telemetry.StreamTracing``)."""
        self.target = channel_target(rag_target)
        self.timeout_s = timeout_s
        self._stream_tracing = stream_tracing
        self._channel = grpc.aio.insecure_channel(
            self.target,
            options=channel_options(self.target, ejection_interval_s, keepalive_s),
            interceptors=list(interceptors) or None,
        )
        self._stub = rag_pb2_grpc.RagServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def chat_stream(self, request: rag_pb2.StreamChatRequest) -> ChatStream:
        """Start a streaming chat; the session's pump reads it (``StreamSession.answered``)."""
        context = contextvars.copy_context()
        return ChatStream(lambda: context.run(self._stream_call, request), request.request_id)

    async def chat(self, request: rag_pb2.ChatRequest) -> rag_pb2.ChatResponse:
        """The unary chat; a non-OK status is raised as the mapped ``BridgeError``."""
        try:
            response: rag_pb2.ChatResponse = await self._stub.Chat(
                request, timeout=self.timeout_s, metadata=_metadata(request.request_id)
            )
        except grpc.aio.AioRpcError as exc:
            raise from_grpc_status(exc.code(), exc.details(), request.request_id) from None
        return response

    def _stream_call(self, request: rag_pb2.StreamChatRequest) -> StreamCall:
        if self._stream_tracing is not None:
            traced: StreamCall = self._stream_tracing.open(
                self._stub.StreamChat,
                request,
                method=STREAM_METHOD,
                timeout=self.timeout_s,
                metadata=_metadata(request.request_id),
            )
            return traced
        call: StreamCall = self._stub.StreamChat(
            request, timeout=self.timeout_s, metadata=_metadata(request.request_id)
        )
        return call

    async def serving(self, timeout: float = 2.0) -> bool:
        """True when the RAG service answers its health check with SERVING."""
        try:
            reply = await self._health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout)
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def close(self) -> None:
        await self._channel.close(None)


def _metadata(request_id: str) -> tuple[tuple[str, str], ...]:
    """The request id travels as metadata too, for proxies and interceptors that never parse the body."""
    return (("x-request-id", request_id),)


# ------------------------------------------------------------------------ the RAG request messages
_ROLES = {"user": rag_pb2.CHAT_ROLE_USER, "assistant": rag_pb2.CHAT_ROLE_ASSISTANT, "system": rag_pb2.CHAT_ROLE_SYSTEM}


def _fields(chat: ChatInput, identity: Identity, request_id: str) -> dict[str, Any]:
    return {
        "query": chat.query,
        # A verified email wins; an anonymous caller's email is a personalisation hint only.
        "user_email": identity.email or chat.user_email or "",
        "user_role": effective_role(identity, chat.user_role) or "",
        "conversation_history": [rag_pb2.ChatMessage(role=_ROLES[r], content=c) for r, c in chat.history],
        "request_id": request_id,
    }


def stream_chat_request(chat: ChatInput, identity: Identity, request_id: str) -> rag_pb2.StreamChatRequest:
    return rag_pb2.StreamChatRequest(**_fields(chat, identity, request_id))


def chat_request(chat: ChatInput, identity: Identity, request_id: str) -> rag_pb2.ChatRequest:
    return rag_pb2.ChatRequest(**_fields(chat, identity, request_id))
