"""Browser security headers, added to every response on its way out rather than per route.

They used to be set by the ``/`` route alone, so ``/static/index.html`` (the same page, served by
StaticFiles) came without CSP, X-Frame-Options and nosniff and the demo could be framed by any
site. Deciding by the response's Content-Type covers every path, error pages included, and
any page added later.
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import Message, Send

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
