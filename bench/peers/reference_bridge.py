"""The obvious bridge a team writes first: the baseline bali-zero-bridge is measured against.

Starlette + sse-starlette's ``EventSourceResponse`` over a ``grpc.aio`` unary-stream call, one
dict per gRPC message, no batching and no tuning; served by uvicorn with uvloop and httptools.
Same URL and frame shape as the real bridge, as far as the load generator looks:
``metadata`` (with ``request_id``), ``token`` (``index``, ``text``) and a final ``done``.

    RAG_TARGET=127.0.0.1:50051 python -m bench.peers.reference_bridge --port 0
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import uvicorn
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bali_zero.rag.v1 import rag_pb2, rag_pb2_grpc

_state: dict[str, Any] = {}


def _dumps(payload: object) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


async def chat_stream(request: Request) -> Any:
    query = request.query_params.get("query", "")
    if not query:
        return JSONResponse({"error": {"code": "bad_request", "message": "query is required"}}, 400)
    request_id = uuid.uuid4().hex
    stub: rag_pb2_grpc.RagServiceStub = _state["stub"]

    async def events() -> AsyncIterator[dict[str, Any]]:
        started = time.monotonic()
        first_token_ms: float | None = None
        seq = 0
        call = stub.StreamChat(rag_pb2.StreamChatRequest(query=query, request_id=request_id))
        try:
            async for message in call:
                kind = message.WhichOneof("event")
                if kind == "metadata":
                    payload: dict[str, Any] = {
                        "type": "metadata",
                        "request_id": message.metadata.request_id,
                        "model": message.metadata.model,
                        "sources": [
                            {"title": s.title, "uri": s.uri, "score": s.score} for s in message.metadata.sources
                        ],
                    }
                elif kind == "token":
                    if first_token_ms is None:
                        first_token_ms = (time.monotonic() - started) * 1000
                    payload = {"type": "token", "index": message.token.index, "text": message.token.text}
                else:
                    payload = {
                        "type": "done",
                        "finish_reason": "stop",
                        "metrics": {
                            "first_token_ms": first_token_ms,
                            "tokens": message.completion.token_count,
                            "duration_ms": (time.monotonic() - started) * 1000,
                        },
                    }
                yield {"id": f"{request_id}:{seq}", "data": _dumps(payload)}
                seq += 1
        except grpc.aio.AioRpcError as exc:
            payload = {
                "type": "error",
                "code": exc.code().name.lower(),
                "message": exc.details() or "",
                "retryable": exc.code() == grpc.StatusCode.UNAVAILABLE,
            }
            yield {"id": f"{request_id}:{seq}", "data": _dumps(payload)}
        finally:
            call.cancel()

    return EventSourceResponse(events(), ping=float(os.environ.get("HEARTBEAT_INTERVAL_S", "15")))


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    channel = grpc.aio.insecure_channel(os.environ.get("RAG_TARGET", "127.0.0.1:50051"))
    _state["stub"] = rag_pb2_grpc.RagServiceStub(channel)  # type: ignore[no-untyped-call]
    print(f"reference-bridge listening on http://{_state['host']}:{_state['port']}", flush=True)
    yield
    await channel.close()


app = Starlette(routes=[Route("/api/v2/bali-zero/chat-stream", chat_stream)], lifespan=lifespan)


def main() -> None:
    parser = argparse.ArgumentParser(prog="reference-bridge")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(4096)  # listening before the ready line is printed, so no early connect is refused
    _state["host"], _state["port"] = sock.getsockname()[:2]
    config = uvicorn.Config(
        app, loop="uvloop", http="httptools", log_level="warning", access_log=False, backlog=4096, lifespan="on"
    )
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
