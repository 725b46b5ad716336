"""The gRPC client side: one shared ``grpc.aio`` channel to the RAG service.

The channel is created in the app's lifespan, inside the server's event loop: a channel made at
import time is bound to another loop and fails with "attached to a different loop".
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bali_zero.rag.v1 import rag_pb2, rag_pb2_grpc

SERVICE_NAME: str = rag_pb2.DESCRIPTOR.services_by_name["RagService"].full_name

class StreamCall(Protocol):
    """The parts of grpc.aio's UnaryStreamCall the bridge uses (grpcio ships no type hints)."""

    async def read(self) -> Any: ...

    def cancel(self) -> bool: ...

    def cancelled(self) -> bool: ...

    def done(self) -> bool: ...

    async def initial_metadata(self) -> Any: ...

    async def code(self) -> grpc.StatusCode: ...

    async def details(self) -> str: ...


def channel_target(rag_target: str) -> str:
    """``host:port``, ``dns:///name:port`` or a comma list ``h1:p1,h2:p2`` (→ ``ipv4:`` URI)."""
    target = rag_target.strip()
    if "," in target and "://" not in target and not target.startswith(("ipv4:", "ipv6:")):
        return "ipv4:" + ",".join(part.strip() for part in target.split(",") if part.strip())
    return target


def channel_options(rag_target: str, ejection_interval_s: float = 10.0) -> list[tuple[str, Any]]:
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
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        # Without a growing receive window a stalled browser stalls the RAG server instead of
        # filling the bridge's memory (back-pressure reaches the producer).
        ("grpc.http2.bdp_probe", 0),
        ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    ]


class Upstream:
    """The RAG service as the bridge sees it: streaming and unary chat plus its health."""

    def __init__(
        self,
        rag_target: str,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
        ejection_interval_s: float = 10.0,
    ) -> None:
        self.target = channel_target(rag_target)
        self._channel = grpc.aio.insecure_channel(
            self.target,
            options=channel_options(self.target, ejection_interval_s),
            interceptors=list(interceptors) or None,
        )
        self._stub = rag_pb2_grpc.RagServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def stream_chat(
        self, request: rag_pb2.StreamChatRequest, *, timeout: float, metadata: Sequence[tuple[str, str]] = ()
    ) -> StreamCall:
        call: StreamCall = self._stub.StreamChat(request, timeout=timeout, metadata=tuple(metadata))
        return call

    async def chat(
        self, request: rag_pb2.ChatRequest, *, timeout: float, metadata: Sequence[tuple[str, str]] = ()
    ) -> rag_pb2.ChatResponse:
        response: rag_pb2.ChatResponse = await self._stub.Chat(request, timeout=timeout, metadata=tuple(metadata))
        return response

    async def serving(self, timeout: float = 2.0) -> bool:
        """True when the RAG service answers its health check with SERVING."""
        try:
            reply = await self._health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=timeout)
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def close(self) -> None:
        await self._channel.close(None)
