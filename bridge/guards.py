"""ASGI guards that run before routing.

They are plain ASGI callables, not ``BaseHTTPMiddleware``: that base class runs the endpoint in
a separate task and hides ``http.disconnect`` from streaming responses, so a browser that goes
away would never cancel its gRPC call.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from bridge.errors import RequestHeadTooLarge
from bridge.openai_compat import error_renderer


class HeaderSizeLimit:
    """Answer 431 when the request's headers and URL exceed ``max_bytes`` in total.

    The exact, per-request check. Memory is bounded earlier, as bytes arrive, by the connection
    protocol (bridge/http_protocol.py), which allows the request line's framing on top; this guard
    is what keeps a head just under that wire bound from reaching JWT parsing and logging.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = sum(len(name) + len(value) + 4 for name, value in scope["headers"])
            size += len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
            if size > self.max_bytes:
                error = RequestHeadTooLarge(f"request headers and URL must total at most {self.max_bytes} bytes")
                await error_renderer(scope["path"])(error, None)(scope, receive, send)
                return
        await self.app(scope, receive, send)
