"""Wires the bridge together: settings → state → routes, with the gRPC channel opened in the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from bridge.audit.http import admin_audit_endpoint
from bridge.config import Settings
from bridge.endpoints import Endpoints
from bridge.errors import BridgeError, MethodNotAllowed, NotFound
from bridge.guards import HeaderSizeLimit
from bridge.openapi import openapi_endpoint
from bridge.responses import error_response
from bridge.state import BridgeState
from bridge.streaming import RAW_SEND_KEY
from bridge.upstream import Upstream

STATIC_DIR = Path(__file__).parent / "static"
log = logging.getLogger("bridge")

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


class BridgeApp(Starlette):
    """Starlette, plus the server's unwrapped ``send`` in the scope for the event-stream writer."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[RAW_SEND_KEY] = send
        await super().__call__(scope, receive, send)


def create_app(settings: Settings, state: BridgeState | None = None) -> Starlette:
    state = state or BridgeState.from_settings(settings)
    endpoints = Endpoints(state)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state.upstream = Upstream(
            settings.rag_target, state.telemetry.client_interceptors(), settings.upstream_ejection_interval_s
        )
        await state.audit.start()
        state.registry.resume_store(settings, state.policy)  # subscribe to remote cancels at boot
        try:
            yield
        finally:
            await state.registry.wait_all(0)
            await state.registry.aclose()  # flush resume-store writes, stop its cancel subscriber
            await state.gate.limiter.aclose()
            await state.upstream.close()
            await state.audit.aclose()  # after the streams: their end records are written too
            await asyncio.to_thread(state.telemetry.shutdown)

    async def index(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)

    async def bridge_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, BridgeError)
        return error_response(exc)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            return error_response(NotFound("no such endpoint"))
        if exc.status_code == 405:
            return error_response(MethodNotAllowed("method not allowed for this endpoint"))
        return error_response(BridgeError(str(exc.detail), code="HTTP_ERROR", status=exc.status_code))

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(BridgeError("internal error", code="INTERNAL"))

    routes = [
        Route("/api/v2/bali-zero/chat-stream", endpoints.chat_stream, methods=["GET", "POST"]),
        Route("/api/v2/bali-zero/chat-stream/{stream_id}", endpoints.cancel_stream, methods=["DELETE"]),
        Route("/api/v2/bali-zero/chat-stream/{stream_id}/cancel", endpoints.cancel_stream, methods=["POST"]),
        Route("/api/v2/bali-zero/chat", endpoints.chat, methods=["POST"]),
        Route("/api/v2/bali-zero/stream-stats", endpoints.stream_stats, methods=["GET"]),
        Route("/metrics", endpoints.metrics, methods=["GET"]),
        Route("/api/admin/audit", admin_audit_endpoint(state.audit, state.gate.identify), methods=["GET"]),
        Route("/openapi.json", openapi_endpoint, methods=["GET"]),
        Route("/healthz", endpoints.healthz, methods=["GET"]),
        Route("/readyz", endpoints.readyz, methods=["GET"]),
        Route("/", index, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    middleware = [Middleware(HeaderSizeLimit, max_bytes=settings.max_header_bytes)]
    if settings.cors_origins:
        # A pure ASGI middleware: unlike BaseHTTPMiddleware it passes http.disconnect through,
        # so cancellation still reaches the stream.
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.cors_origins),
                allow_methods=["GET", "POST", "DELETE"],
                allow_headers=["authorization", "content-type", "last-event-id", "x-connection-id",
                               "x-user-id", "traceparent", "tracestate"],
                expose_headers=["x-connection-id", "x-request-id", "retry-after", "ratelimit-limit",
                                "ratelimit-remaining", "ratelimit-reset"],
                max_age=600,
            )
        )
    app = BridgeApp(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={BridgeError: bridge_error, HTTPException: http_error, Exception: unexpected},
    )
    app.state.bridge = state
    return app
