"""In-process unit tests of the gRPC status mapping: stable client messages, details only in the log."""

from __future__ import annotations

import inspect
import logging

import grpc
import pytest

from bridge import errors
from bridge.errors import (
    CLIENT_MESSAGES,
    GRPC_STATUS_MAP,
    BadRequest,
    BridgeError,
    UpstreamError,
    from_grpc_status,
)

LEAKY = "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:41397: Connection refused"


@pytest.mark.parametrize("code", [c for c in grpc.StatusCode if c != grpc.StatusCode.OK])
def test_client_message_is_stable_and_hides_details(code: grpc.StatusCode) -> None:
    error = from_grpc_status(code, LEAKY, "req-1")
    assert error.message == CLIENT_MESSAGES[error.code]
    for visible in (error.body(), error.frame()):
        text = repr(visible)
        assert "127.0.0.1" not in text and "ipv4" not in text and "41397" not in text


def test_every_mapped_code_has_a_client_message() -> None:
    assert {code for code, _, _ in GRPC_STATUS_MAP.values()} <= set(CLIENT_MESSAGES)


def test_details_are_logged_with_the_request_id(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="bridge.upstream"):
        from_grpc_status(grpc.StatusCode.UNAVAILABLE, LEAKY, "req-42")
    (record,) = [r for r in caplog.records if r.name == "bridge.upstream"]
    assert record.__dict__["request_id"] == "req-42"
    assert record.__dict__["grpc_details"] == LEAKY
    assert record.__dict__["grpc_status"] == "UNAVAILABLE"


def test_status_class_and_retry_hint_follow_the_table() -> None:
    unavailable = from_grpc_status(grpc.StatusCode.UNAVAILABLE, None)
    assert isinstance(unavailable, UpstreamError)
    assert (unavailable.status, unavailable.code, unavailable.retryable) == (503, "UPSTREAM_UNAVAILABLE", True)
    assert unavailable.headers() == {"Retry-After": "1"}
    invalid = from_grpc_status(grpc.StatusCode.INVALID_ARGUMENT, "query: must not be empty")
    assert isinstance(invalid, BadRequest) and invalid.status == 400
    assert from_grpc_status(grpc.StatusCode.DEADLINE_EXCEEDED, "x").headers() == {}


def test_logged_details_are_bounded(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="bridge.upstream"):
        from_grpc_status(grpc.StatusCode.INTERNAL, "x" * 1_000_000, "req-big")
    (record,) = [r for r in caplog.records if r.name == "bridge.upstream"]
    assert 0 < len(record.__dict__["grpc_details"]) <= 4096


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
