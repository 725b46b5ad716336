"""Fast in-process tests of the pure pieces the process tests reach only end to end:
event-id parsing, reading and validating input, Settings validation, the error tree (the gRPC
status table itself: tests/test_errors_unit.py; the text check: tests/test_inputs_unit.py)."""

from __future__ import annotations

import inspect
import json

import grpc
import pytest
from starlette.requests import Request

from bridge import errors
from bridge.config import Settings
from bridge.errors import BadRequest, BridgeError, ConfigError, PayloadTooLarge, UnsupportedMediaType, from_grpc_status
from bridge.inputs import Limits, read_input, validate
from bridge.stream.frames import parse_event_id, parse_seq, resume_point
from bzb_shared.fit import least_squares_slope

LIMITS = Limits(max_query_bytes=100, max_body_bytes=2048, max_history_messages=2)


# -- event ids ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("abc_-9:0", ("abc_-9", 0)),
        ("s:123456789012345678", ("s", 123456789012345678)),
        ("s:1234567890123456789", None),  # 19 digits: beyond the bridge's own ids
        ("s:²", None),  # str.isdigit() accepts it; the bridge never issues it
        ("s:1\n", None),
        ("s\r:1", None),
        (":1", None),
        ("s:", None),
        ("a" * 65 + ":1", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_event_id_accepts_only_the_alphabet_the_bridge_issues(value: str | None, expected: object) -> None:
    assert parse_event_id(value) == expected


def test_bare_seq_needs_the_connection_id_header() -> None:
    assert parse_seq("17") == 17 and parse_seq("x") is None and parse_seq("") is None
    assert resume_point("17", None, "abc") == ("abc", 17)
    assert resume_point("17", None, None) is None
    assert resume_point(None, "abc:3", None) == ("abc", 3)
    assert resume_point("abc:4", "other:9", None) == ("abc", 4)  # the header wins
    assert resume_point("17", None, "bad id!") is None


# -- input validation -----------------------------------------------------------------------------


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
    chat = await read_input(request, LIMITS)
    assert chat.query == "visa" and chat.user_role == "member" and chat.history == (("user", "hi"),)


async def test_post_needs_json() -> None:
    with pytest.raises(UnsupportedMediaType):
        await read_input(make_request("POST", body=b"query=x", headers={"content-type": "text/plain"}), LIMITS)


async def test_post_body_over_the_limit_is_413_even_without_content_length() -> None:
    body = json.dumps({"query": "x" * 4000}).encode()
    with pytest.raises(PayloadTooLarge):
        await read_input(make_request("POST", body=body, headers={"content-type": "application/json"}), LIMITS)


async def test_post_with_a_lying_content_length_is_refused() -> None:
    request = make_request("POST", body=b"{}", headers={"content-type": "application/json", "content-length": "-1"})
    with pytest.raises(BadRequest):
        await read_input(request, LIMITS)


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
        validate(data, LIMITS)
    assert info.value.code == code and info.value.status == 400


# -- Settings -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"HEARTBEAT_INTERVAL_S": "0"}, "HEARTBEAT_INTERVAL_S"),
        ({"HEARTBEAT_INTERVAL_S": "nan"}, "HEARTBEAT_INTERVAL_S"),
        ({"SSE_ROLLOUT_PERCENT": "101"}, "SSE_ROLLOUT_PERCENT"),
        ({"ENABLE_SSE_STREAMING": "maybe"}, "ENABLE_SSE_STREAMING"),
        ({"MAX_STREAMS_TOTAL": "0"}, "MAX_STREAMS_TOTAL"),
        ({"RESUME_BUFFER_BYTES": "10"}, "RESUME_BUFFER_BYTES"),
        ({"RATE_LIMIT": "lots"}, "RATE_LIMIT"),
        ({"RATE_LIMIT_STORAGE": "mysql://x"}, "RATE_LIMIT_STORAGE"),
        ({"AUTH_REQUIRED": "true"}, "AUTH_REQUIRED"),
        ({"JWT_SECRET": "a", "JWT_JWKS_URL": "https://x"}, "JWT_SECRET"),
        ({"TRUSTED_PROXIES": "not-a-net"}, "TRUSTED_PROXIES"),
    ],
)
def test_a_bad_setting_is_refused_at_start_up_naming_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError, match=variable) as info:
        Settings.from_env(env)
    assert "\n" not in str(info.value)


def test_defaults_are_valid_and_values_are_typed() -> None:
    settings = Settings.from_env(
        {"HEARTBEAT_INTERVAL_S": "2.5", "MAX_STREAMS_TOTAL": "1_000", "ENABLE_SSE_STREAMING": "on"}
    )
    assert settings.heartbeat_interval_s == 2.5 and settings.max_streams_total == 1000
    assert settings.enable_sse_streaming is True
    assert Settings.from_env({}).rate_limit_per_window[0] >= 1


# -- errors ---------------------------------------------------------------------------------------


def test_every_status_code_maps_to_an_error_status() -> None:
    for code in grpc.StatusCode:
        if code is not grpc.StatusCode.OK:
            assert from_grpc_status(code, "x").status >= 400


def test_no_error_class_carries_a_success_status() -> None:
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, BridgeError)]
    assert len(classes) >= 12
    for cls in classes:
        assert cls.status >= 400, cls


def test_error_body_and_frame_have_the_same_code() -> None:
    error = errors.StreamExpired("gone", retryable=False)
    assert error.body() == {"error": {"code": "STREAM_EXPIRED", "message": "gone"}}
    assert error.frame() == {"type": "error", "code": "STREAM_EXPIRED", "message": "gone", "retryable": False}


# --- least-squares slope (every memory figure: RSS per stream, per cancel, per minute) ---


def test_slope_of_a_line_with_noise_around_it() -> None:
    xs = [float(x) for x in range(10)]
    ys = [3.0 * x + 7.0 + (0.5 if x % 2 else -0.5) for x in xs]
    assert least_squares_slope(xs, ys) == pytest.approx(3.0, abs=0.2)


@pytest.mark.parametrize(("xs", "ys"), [([], []), ([1.0], [5.0]), ([2.0, 2.0, 2.0], [1.0, 9.0, 4.0])])
def test_slope_is_zero_without_two_distinct_points(xs: list[float], ys: list[float]) -> None:
    assert least_squares_slope(xs, ys) == 0.0
