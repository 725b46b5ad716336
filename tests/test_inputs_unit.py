"""In-process unit tests of the chat input's text check (the HTTP side is in test_attacks_small)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from bridge.errors import BadRequest
from bridge.inputs import Limits, check_text, validate

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
