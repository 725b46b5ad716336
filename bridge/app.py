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
from starlette.routing import Mount, Route, Router
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from bridge import openai_compat
from bridge.apidocs import docs_routes, openapi_endpoint
from bridge.audit.http import admin_audit_endpoint
from bridge.config import Settings
from bridge.endpoints import Endpoints, worker_stats
from bridge.errors import BridgeError, MethodNotAllowed, NotFound
from bridge.middleware import HeaderSizeLimit, with_security_headers
from bridge.resume.client import ResumeStore
from bridge.state import BridgeState
from bridge.upstream import Upstream
from bridge.workers.peers import PeerServer

STATIC_DIR = Path(__file__).parent / "static"
log = logging.getLogger("bridge")


class BridgeApp(Starlette):
    """Starlette, with every response sent through ``with_security_headers``, outside every
    middleware, so even the outermost error handler's responses carry them."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            send = with_security_headers(send)
        await super().__call__(scope, receive, send)


def create_app(settings: Settings, state: BridgeState | None = None) -> Starlette:
    state = state or BridgeState.from_settings(settings)
    endpoints = Endpoints(state)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state.upstream = Upstream(
            settings.rag_target,
            state.telemetry.client_interceptors(),
            settings.upstream_ejection_interval_s,
            timeout_s=settings.upstream_timeout_s,
            keepalive_s=settings.upstream_keepalive_s,
            stream_tracing=state.telemetry.stream_tracing(),
        )
        await state.audit.start()
        if settings.resume_store and settings.resume_grace_s > 0:
            state.resume_store = ResumeStore(settings.resume_store, state.policy, on_cancel=state.registry.cancel)
            state.resume_store.start()  # subscribe to remote cancels at boot
            state.metrics.watch_resume_store(state.resume_store.stats)
        peers = None
        if state.role.peers_dir is not None:  # one of several workers: answer the others' stats asks
            peers = PeerServer(state.role.peers_dir, state.role.slot, lambda: worker_stats(state))
            await peers.start()
        publisher = None
        if state.metrics.multiprocess_dir is not None:
            publisher = asyncio.get_running_loop().create_task(state.metrics.publish_forever())
        try:
            yield
        finally:
            if publisher is not None:
                publisher.cancel()
            if peers is not None:
                await peers.aclose()
            # Every stream ended (the grace, then SHUTTING_DOWN), its end mirrored to the store
            # and reported to the audit trail, before anything those need is closed.
            try:
                await state.drained()
            except Exception:  # a bug in the drain must not skip the audit flush below
                log.exception("shutdown: the drain failed; closing anyway")
            if state.resume_store is not None:  # flush its writes, stop its cancel subscriber
                await state.resume_store.aclose()
            await state.gate.aclose()
            await state.caps.aclose()
            await state.upstream.close()
            await state.refusals.aclose()  # the counts folded since the last window close
            await state.audit.aclose()  # after the streams: their end records are written too
            await asyncio.to_thread(state.telemetry.shutdown)

    async def index(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html")

    async def bridge_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, BridgeError)
        return openai_compat.error_renderer(request.scope["path"])(exc, None)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        respond = openai_compat.error_renderer(request.scope["path"])
        if exc.status_code == 404:
            return respond(NotFound("no such endpoint"), None)
        if exc.status_code == 405:  # keeps Starlette's Allow header, which RFC 9110 requires
            return respond(MethodNotAllowed("method not allowed for this endpoint"), exc.headers)
        return respond(BridgeError(str(exc.detail), code="HTTP_ERROR", status=exc.status_code), None)

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        return openai_compat.error_renderer(request.scope["path"])(BridgeError("internal error", code="INTERNAL"), None)

    routes = [
        _without_head(Route("/api/v2/bali-zero/chat-stream", endpoints.chat_stream, methods=["GET", "POST"])),
        # Gated like a chat request (rate limit, stream slot): a HEAD would spend both for nothing.
        _without_head(Route("/api/v2/bali-zero/chat-stream/diagnostic", endpoints.diagnostic_stream, methods=["GET"])),
        Route("/api/v2/bali-zero/chat-stream/{stream_id}", endpoints.cancel_stream, methods=["DELETE"]),
        Route("/api/v2/bali-zero/chat-stream/{stream_id}/cancel", endpoints.cancel_stream, methods=["POST"]),
        Route("/api/v2/bali-zero/chat", endpoints.chat, methods=["POST"]),
        # The OpenAI-compatible face of the same gate and stream (bridge/openai_compat.py).
        Route(openai_compat.CHAT_COMPLETIONS_PATH, endpoints.openai_chat_completions, methods=["POST"]),
        _without_head(Route(openai_compat.MODELS_PATH, endpoints.openai_models, methods=["GET"])),
        Route("/api/v2/bali-zero/stream-stats", endpoints.stream_stats, methods=["GET"]),
        Route("/metrics", endpoints.metrics, methods=["GET"]),
        _without_head(
            Route(
                "/api/admin/audit",
                admin_audit_endpoint(state.audit, state.gate.control, state.gate.refuse),
                methods=["GET"],
            )
        ),
        Route("/openapi.json", openapi_endpoint, methods=["GET"]),
        *docs_routes(STATIC_DIR / "docs.html"),
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
                allow_headers=[
                    "authorization",
                    "content-type",
                    "last-event-id",
                    "x-connection-id",
                    "x-user-id",
                    "traceparent",
                    "tracestate",
                ],
                expose_headers=[
                    "x-connection-id",
                    "x-request-id",
                    "retry-after",
                    "ratelimit-limit",
                    "ratelimit-remaining",
                    "ratelimit-reset",
                ],
                max_age=600,
            )
        )
    app = BridgeApp(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={BridgeError: bridge_error, HTTPException: http_error, Exception: unexpected},
    )
    _without_slash_redirects(app.router)
    app.state.bridge = state
    return app


def _without_slash_redirects(router: Router) -> None:
    """Every path has one spelling; the other slash variant is a 404, in this router and in every
    router mounted under it.

    Starlette answers the other variant (``/metrics/``, ``/docs/assets/x.css/``) with a 307 whose
    Location it builds from the request's Host header and scheme: any client could make the
    bridge send ``Location: http://evil.example/metrics`` (a shared cache then serves that to
    others), and behind a TLS proxy the redirect pointed to plain http. A relative Location
    would still drop a proxy's path prefix; an API client spells its paths exactly.
    """
    router.redirect_slashes = False
    for route in router.routes:
        if isinstance(route, Mount) and isinstance(route.app, Router):
            _without_slash_redirects(route.app)


def _without_head(route: Route) -> Route:
    """The route without the HEAD that Starlette adds to every GET route.

    A handler with side effects runs in full for HEAD, only the body is dropped: HEAD on the
    stream endpoint would take a rate-limit slot and, with a JSON body, open a real upstream stream
    whose tokens nobody reads. Such routes answer HEAD with 405 and ``Allow``.
    """
    assert route.methods is not None
    route.methods.discard("HEAD")
    return route
