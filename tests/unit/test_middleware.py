"""In-process unit tests of the security headers added on the way out (HTTP side: test_attacks_small)."""

from __future__ import annotations

import pytest
from starlette.types import Message

from bridge.middleware import CSP, with_security_headers


async def sent_headers(content_type: bytes | None, extra: list[tuple[bytes, bytes]] | None = None) -> dict[str, str]:
    out: list[Message] = []

    async def send(message: Message) -> None:
        out.append(message)

    headers = ([(b"content-type", content_type)] if content_type else []) + (extra or [])
    await with_security_headers(send)({"type": "http.response.start", "status": 200, "headers": headers})
    await with_security_headers(send)({"type": "http.response.body", "body": b"x"})
    assert out[1] == {"type": "http.response.body", "body": b"x"}, "bodies pass untouched"
    return {k.decode().lower(): v.decode() for k, v in out[0]["headers"]}


@pytest.mark.parametrize("content_type", [b"text/html; charset=utf-8", b"TEXT/HTML", b"image/svg+xml"])
async def test_documents_get_the_page_headers(content_type: bytes) -> None:
    headers = await sent_headers(content_type)
    assert headers["content-security-policy"] == CSP
    assert headers["x-frame-options"] == "DENY"
    assert headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("content_type", [b"application/json", b"text/javascript", b"text/css", None])
async def test_other_responses_get_nosniff_only(content_type: bytes | None) -> None:
    headers = await sent_headers(content_type)
    assert headers["x-content-type-options"] == "nosniff"
    assert "content-security-policy" not in headers and "x-frame-options" not in headers


async def test_a_handlers_own_header_wins() -> None:
    headers = await sent_headers(b"text/html", [(b"x-frame-options", b"SAMEORIGIN")])
    assert headers["x-frame-options"] == "SAMEORIGIN"
