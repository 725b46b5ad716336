"""Turning an HTTP request into a validated chat input; every rejection is a typed 4xx."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from starlette.requests import ClientDisconnect, Request

from bridge.errors import BadRequest, ClientDisconnected, PayloadTooLarge, UnsupportedMediaType

ROLES = ("user", "assistant", "system")
# Matched with ``fullmatch``: ``re.match`` with ``$`` also accepts the text followed by one "\n",
# so "a@b\n" passed as an address and reached the RAG service with its line break.
_EMAIL = re.compile(r"[^@\s\x00-\x1f]{1,64}@[^@\s\x00-\x1f]{1,190}")
_FIELD = re.compile(r"[A-Za-z0-9_.\-]{1,32}")


@dataclass(frozen=True, slots=True)
class ChatInput:
    query: str
    user_email: str | None = None
    user_role: str | None = None
    history: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Limits:
    max_query_bytes: int
    max_body_bytes: int
    max_history_messages: int


async def read_input(request: Request, limits: Limits) -> ChatInput:
    """Parse GET query parameters or a POST JSON body."""
    if request.method == "GET":
        params = request.query_params
        history_raw = params.get("conversation_history")
        history: Any = [] if not history_raw else _loads(history_raw, "conversation_history")
        return validate(
            {
                "query": params.get("query"),
                "user_email": params.get("user_email"),
                "user_role": params.get("user_role"),
                "conversation_history": history,
            },
            limits,
        )
    return validate(await read_json_object(request, limits), limits)


async def read_json_object(request: Request, limits: Limits) -> dict[str, Any]:
    """A POST body that must be a JSON object: 415 for another media type, 413 past
    MAX_BODY_BYTES (refused as the bytes arrive), 400 for anything but an object."""
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type != "application/json":
        raise UnsupportedMediaType("send the request as Content-Type: application/json")
    body = await read_body(request, limits.max_body_bytes)
    data = _loads(body, "body")
    if not isinstance(data, dict):
        raise BadRequest("the JSON body must be an object", code="INVALID_JSON")
    return data


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The body, refusing more than ``max_bytes`` without reading the rest into memory."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest("invalid Content-Length")
        if int(declared) > max_bytes:
            raise PayloadTooLarge(f"the body must be at most {max_bytes} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise PayloadTooLarge(f"the body must be at most {max_bytes} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientDisconnected("the client closed the connection before the body was complete") from None
    return b"".join(chunks)


def _loads(raw: str | bytes, what: str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise BadRequest(f"{what} is not valid JSON", code="INVALID_JSON") from None


def validate(data: Mapping[str, Any], limits: Limits) -> ChatInput:
    query = check_query(data.get("query"), limits)
    email = _optional_str(data, "user_email")
    if email is not None and not _EMAIL.fullmatch(email):
        raise BadRequest("user_email is not an email address")
    role = _optional_str(data, "user_role")
    if role is not None and not _FIELD.fullmatch(role):
        raise BadRequest("user_role must be a short word such as member")
    return ChatInput(query, email, role, check_history(data.get("conversation_history"), limits))


def check_query(query: Any, limits: Limits, name: str = "query") -> str:
    """The question, checked; ``name`` is how the request spelled it (the 400 names it).

    Shared by every way of asking (bridge/openai_compat.py too), so a limit holds on all of them.
    """
    if not isinstance(query, str) or not query.strip():
        raise BadRequest(f"{name} is required and must be a non-empty string", code="QUERY_REQUIRED", param=name)
    if len(query.encode("utf-8", "surrogatepass")) > limits.max_query_bytes:
        raise BadRequest(f"{name} must be at most {limits.max_query_bytes} bytes", code="QUERY_TOO_LONG", param=name)
    check_text(query, name)
    return query


def _optional_str(data: Mapping[str, Any], name: str) -> str | None:
    value = data.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string")
    check_text(value, name)
    return value


def check_history(raw: Any, limits: Limits, name: str = "conversation_history") -> tuple[tuple[str, str], ...]:
    """The earlier turns, checked: a list of at most MAX_HISTORY_MESSAGES ``{role, content}``.

    ``name`` is how the request spelled the list (item errors name ``name[i]``); shared like
    ``check_query``.
    """
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise BadRequest(f"{name} must be a JSON list of {{role, content}}", code="INVALID_HISTORY", param=name)
    if len(raw) > limits.max_history_messages:
        raise BadRequest(
            f"{name} has more than {limits.max_history_messages} messages", code="INVALID_HISTORY", param=name
        )
    out = []
    for i, item in enumerate(raw):
        where = f"{name}[{i}]"
        if not isinstance(item, dict) or set(item) - {"role", "content"}:
            raise BadRequest(
                f"{where} must be an object with role and content only", code="INVALID_HISTORY", param=where
            )
        role, content = item.get("role"), item.get("content")
        if role not in ROLES:
            raise BadRequest(
                f"{where}.role must be one of {', '.join(ROLES)}", code="INVALID_HISTORY", param=f"{where}.role"
            )
        if not isinstance(content, str) or not content:
            raise BadRequest(
                f"{where}.content must be a non-empty string", code="INVALID_HISTORY", param=f"{where}.content"
            )
        check_text(content, f"{where}.content")
        out.append((role, content))
    return tuple(out)


def check_text(text: str, name: str) -> None:
    """Refuse a lone surrogate in any string field, naming the field in the 400.

    JSON's ``\\ud800`` escape yields a lone surrogate that no UTF-8 encoder accepts: before this
    check ran on every field, such a ``user_email`` reached protobuf serialisation and answered
    500. NUL is a character like any other in free text (the SSE edge-case payloads push it end
    to end, and the query reaches SQLite only as an HMAC, logs never); identifier fields refuse it
    and every other control character through their own patterns.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{name} is not valid Unicode text (lone surrogate)", param=name) from None
