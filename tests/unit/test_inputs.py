"""In-process unit tests of the chat input's text check (the HTTP side is in test_attacks_small)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from starlette.requests import Request

from bridge.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from bridge.inputs import Limits, check_text, read_input, validate

LIMITS = Limits(max_query_bytes=1024, max_body_bytes=4096, max_history_messages=4)


def parsed(raw: str) -> dict[str, Any]:
    """A body as the bridge's JSON parser yields it (``\\ud800`` escapes become lone surrogates)."""
    return dict(json.loads(raw))


@pytest.mark.parametrize("text", ["\ud800", "a\udfffb", "\ud83d", "ok \udc00"])
def test_lone_surrogates_are_refused_naming_the_field(text: str) -> None:
    with pytest.raises(BadRequest) as caught:
        check_text(text, "user_email")
    assert caught.value.status == 400
    assert caught.value.code == "INVALID_REQUEST"
    assert "user_email" in caught.value.message


@pytest.mark.parametrize("text", ["plain", "é", "👩\u200d👩\u200d👧", "\x00", "\r\n", "\u2028", "\ufffd", ""])
def test_valid_text_passes_including_nul_in_free_text(text: str) -> None:
    check_text(text, "query")


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ('{"query":"hi","user_email":"a\\ud800@example.com"}', "user_email"),
        ('{"query":"hi","user_role":"\\udfff"}', "user_role"),
        ('{"query":"\\ud800"}', "query"),
        (
            '{"query":"hi","conversation_history":[{"role":"user","content":"x\\udc00"}]}',
            "conversation_history[0].content",
        ),
        ('{"query":"hi","user_email":"a\\u0000@example.com"}', "user_email"),
        ('{"query":"hi","user_role":"mem\\u0000ber"}', "user_role"),
    ],
)
def test_every_string_field_is_checked(raw: str, field: str) -> None:
    with pytest.raises(BadRequest) as caught:
        validate(parsed(raw), LIMITS)
    assert caught.value.message.startswith(field)


def test_nul_in_free_text_round_trips() -> None:
    chat = validate(
        parsed('{"query":"a\\u0000b","conversation_history":[{"role":"user","content":"\\u0000"}]}'), LIMITS
    )
    assert chat.query == "a\x00b" and chat.history == (("user", "\x00"),)


SMALL_LIMITS = Limits(max_query_bytes=100, max_body_bytes=2048, max_history_messages=2)


def make_request(method: str, *, query: str = "", body: bytes = b"", headers: dict[str, str] | None = None) -> Request:
    raw_headers = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    scope = {"type": "http", "method": method, "path": "/", "query_string": query.encode(), "headers": raw_headers}
    sent = False

    async def receive() -> dict[str, object]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(scope, receive)


async def test_get_input_comes_from_the_query_string() -> None:
    history = json.dumps([{"role": "user", "content": "hi"}])
    request = make_request("GET", query=f"query=visa&user_role=member&conversation_history={history}")
    chat = await read_input(request, SMALL_LIMITS)
    assert chat.query == "visa" and chat.user_role == "member" and chat.history == (("user", "hi"),)


async def test_post_needs_json() -> None:
    with pytest.raises(UnsupportedMediaType):
        await read_input(make_request("POST", body=b"query=x", headers={"content-type": "text/plain"}), SMALL_LIMITS)


async def test_post_body_over_the_limit_is_413_even_without_content_length() -> None:
    body = json.dumps({"query": "x" * 4000}).encode()
    with pytest.raises(PayloadTooLarge):
        await read_input(make_request("POST", body=body, headers={"content-type": "application/json"}), SMALL_LIMITS)


async def test_post_with_a_lying_content_length_is_refused() -> None:
    request = make_request("POST", body=b"{}", headers={"content-type": "application/json", "content-length": "-1"})
    with pytest.raises(BadRequest):
        await read_input(request, SMALL_LIMITS)


@pytest.mark.parametrize(
    ("data", "code"),
    [
        ({}, "QUERY_REQUIRED"),
        ({"query": "   "}, "QUERY_REQUIRED"),
        ({"query": 5}, "QUERY_REQUIRED"),
        ({"query": "é" * 51}, "QUERY_TOO_LONG"),  # 102 bytes: the limit counts UTF-8 bytes
        ({"query": "\ud800"}, "INVALID_REQUEST"),  # a lone surrogate cannot travel over gRPC
        ({"query": "q", "user_email": "nope"}, "INVALID_REQUEST"),
        ({"query": "q", "user_role": "admin; drop"}, "INVALID_REQUEST"),
        ({"query": "q", "conversation_history": {}}, "INVALID_HISTORY"),
        ({"query": "q", "conversation_history": [{"role": "user", "content": "a"}] * 3}, "INVALID_HISTORY"),
        ({"query": "q", "conversation_history": [{"role": "root", "content": "a"}]}, "INVALID_HISTORY"),
        ({"query": "q", "conversation_history": [{"role": "user", "content": "a", "x": 1}]}, "INVALID_HISTORY"),
    ],
)
def test_invalid_input_is_a_typed_400(data: dict[str, object], code: str) -> None:
    with pytest.raises(BadRequest) as info:
        validate(data, SMALL_LIMITS)
    assert info.value.code == code and info.value.status == 400


DEFAULT_LIMITS = Limits(max_query_bytes=8192, max_body_bytes=65536, max_history_messages=50)


@pytest.mark.parametrize(
    ("field", "value"),
    [("user_email", "a@b.example\n"), ("user_role", "member\n"), ("user_email", "a@b\nc")],
)
def test_identifier_field_with_line_feed_is_refused(field: str, value: str) -> None:
    with pytest.raises(BadRequest, match=field):
        validate({"query": "hi", field: value}, DEFAULT_LIMITS)
    assert (
        validate({"query": "hi", "user_email": "a@b.example", "user_role": "member"}, DEFAULT_LIMITS).user_role
        == "member"
    )
