"""Serve a RagService implementation the way the stub does, until SIGINT/SIGTERM.

For the test RAG servers (tests/support/recording_rag.py, tests/support/hostile_rag.py): health
says SERVING for the service and for "", and the stub's ``rag-stub listening on HOST:PORT`` line
is printed once ready, so the ``Process`` helpers wait for that line instead of sleeping.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any


async def serve_until_signalled(servicer: Any, host: str, port: int) -> None:
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from bali_zero.rag.v1 import rag_pb2, rag_pb2_grpc

    server = grpc.aio.server()
    rag_pb2_grpc.add_RagServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    for name in ("", rag_pb2.DESCRIPTOR.services_by_name["RagService"].full_name):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"rag-stub listening on {host}:{bound}", flush=True)
    await stop.wait()
    await server.stop(1)
