"""The ASGI middleware: the guard that runs before routing, and the headers added on the way out.

Both are plain ASGI callables, not ``BaseHTTPMiddleware``: that base class runs the endpoint in
a separate task and hides ``http.disconnect`` from streaming responses, so a browser that goes
away would never cancel its gRPC call.

``HeaderSizeLimit`` answers 431 before routing. ``with_security_headers`` adds the browser
security headers to every response on its way out rather than per route: set by one route, they
left the same page served by StaticFiles (``/static/index.html``) without CSP, X-Frame-Options and
nosniff, so the demo could be framed by any site. Deciding by the response's Content-Type covers
every path, error pages included, and any page added later.
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bridge.errors import RequestHeadTooLarge
from bridge.openai_compat import error_renderer


class HeaderSizeLimit:
    """Answer 431 when the request's headers and URL exceed ``max_bytes`` in total.

    The exact, per-request check. Memory is bounded earlier, as bytes arrive, by the connection
    protocol (bridge/server/protocol.py), which allows the request line's framing on top; this guard
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


# ----------------------------------------------------------------- security headers on the way out
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
_NOSNIFF = {"X-Content-Type-Options": "nosniff"}
# Types a browser renders as a document that can run script or be framed.
_PAGE_TYPES = ("text/html", "application/xhtml+xml", "image/svg+xml")


def _is_page(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() in _PAGE_TYPES


def with_security_headers(send: Send) -> Send:
    """``send``, adding nosniff to every response and the page headers to every document.

    A header the handler set itself wins (setdefault), so a route can still choose stricter ones.
    """

    async def secure_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = MutableHeaders(scope=message)
            extra = PAGE_HEADERS if _is_page(headers.get("content-type", "")) else _NOSNIFF
            for name, value in extra.items():
                headers.setdefault(name, value)
        await send(message)

    return secure_send
