"""Every failure the bridge reports, in one place.

Before a stream starts an error is an HTTP status with a JSON body
``{"error": {"code", "message"}}``; after it started it is an ``error`` SSE frame with
``code``, ``message`` and ``retryable``. Both come from the same ``BridgeError`` so a code means
the same thing on either path. The OpenAI-compatible API (bridge/openai_compat.py) renders the
same errors in the shape OpenAI clients parse, ``{"error": {"message", "type", "code", "param"}}``
(``openai_body``), over HTTP and mid-stream alike: one tree, two renderings. No error class
carries a success status: an error that is only ever sent as a frame (``StreamExpired``) still
has the status it would have over plain HTTP.

    BridgeError                    answered as JSON (HTTP) or as an ``error`` frame (mid-stream)
    ├── BadRequest            400 INVALID_REQUEST / INVALID_JSON / QUERY_TOO_LONG / UNSUPPORTED_PARAMETER / ...
    ├── ClientDisconnected    400 CLIENT_DISCONNECTED: the client left mid-body (never answered)
    ├── Unauthorized          401 UNAUTHORIZED
    ├── Forbidden             403 FORBIDDEN
    ├── NotFound              404 NOT_FOUND / STREAMING_DISABLED / STREAM_NOT_FOUND / MODEL_NOT_FOUND
    ├── MethodNotAllowed      405 METHOD_NOT_ALLOWED
    ├── RequestHeadTimeout    408 HEADER_TIMEOUT (written by the connection, bridge/server/protocol.py)
    ├── RequestBodyTimeout    408 BODY_TIMEOUT (likewise)
    ├── StreamExpired         410 STREAM_EXPIRED (sent as an ``error`` frame: a late or invalid resume)
    ├── PayloadTooLarge       413 PAYLOAD_TOO_LARGE
    ├── UnsupportedMediaType  415 UNSUPPORTED_MEDIA_TYPE
    ├── TooManyRequests       429 RATE_LIMITED / TOO_MANY_STREAMS (+ Retry-After)
    ├── RequestHeadTooLarge   431 HEADERS_TOO_LARGE
    ├── ServiceUnavailable    503 UPSTREAM_UNAVAILABLE / OVERLOADED / SHUTTING_DOWN (+ Retry-After)
    │   ├── ResumeStoreUnavailable  503 RESUME_UNAVAILABLE (Redis could not be asked; retryable)
    │   └── OwnerUnreachable  503 OWNER_UNREACHABLE: a cross-instance stop reached no one
    └── UpstreamError         mapped from a gRPC status by ``from_grpc_status``

    Rejected                       a gate refusal: a BridgeError plus the headers and identity
    ClientGone                     the HTTP client left or stopped reading (never answered)
    ConfigError (ValueError)       a setting the bridge cannot start with; names the variable
    ├── UnsafeFile                 a file it trusts (key, store, head, log) others could choose
    └── UnsupportedUvicorn         an installed uvicorn outside the tested range, or lacking a name
                                   the connection protocol uses (bridge/server/uvicorn_fence.py)
    FrameError (ValueError)        a field value that would corrupt an event stream
    AuditChainBroken               the audit chain does not verify: retention refuses to purge
    DoctorError                    ``bali-zero-bridge doctor`` could not run its check (exit 2)
    TelemetryConfigError           an unusable OTEL_* value; defined in ``bzb_shared.otel``
                                   because the stub raises it too, re-exported here

Over HTTP an error is written by ``error_response``, as a ``JSONResponse``: UTF-8 JSON that never
fails to encode (a lone surrogate is escaped), so no answer turns into a 500 or carries a traceback.
``JSONResponse`` writes the bridge's JSON answers too.

Outcomes that are expected answers rather than failures (a resume finding its frames trimmed, a
stream already over) are return values of the functions that find them, not exceptions.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import grpc
from starlette.responses import Response

from bridge.types import Identity
from bzb_shared.otel import TelemetryConfigError

__all__ = [
    "AuditChainBroken",
    "BadRequest",
    "BridgeError",
    "ClientGone",
    "ConfigError",
    "DoctorError",
    "Forbidden",
    "FrameError",
    "MethodNotAllowed",
    "NotFound",
    "PayloadTooLarge",
    "Rejected",
    "RequestBodyTimeout",
    "RequestHeadTimeout",
    "RequestHeadTooLarge",
    "ResumeStoreUnavailable",
    "ServiceUnavailable",
    "StreamExpired",
    "TelemetryConfigError",
    "TooManyRequests",
    "UnsafeFile",
    "UnsupportedMediaType",
    "UnsupportedUvicorn",
    "UpstreamError",
    "from_grpc_status",
]


class BridgeError(Exception):
    """An error with a stable machine-readable code, an HTTP status and a retry hint."""

    status: int = 500
    default_code: ClassVar[str] = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        retryable: bool = False,
        retry_after_s: float | None = None,
        status: int | None = None,
        param: str | None = None,
    ) -> None:
        """``param``: the request parameter at fault, when one is (the OpenAI rendering names it)."""
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.retryable = retryable
        self.retry_after_s = retry_after_s
        self.param = param
        if status is not None:
            self.status = status

    def body(self) -> dict[str, Any]:
        """The JSON body of an HTTP error response."""
        return {"error": {"code": self.code, "message": self.message}}

    def frame(self) -> dict[str, Any]:
        """The data of an ``error`` SSE frame."""
        return {"type": "error", "code": self.code, "message": self.message, "retryable": self.retryable}

    def openai_body(self) -> dict[str, Any]:
        """The error as OpenAI clients parse it: the body of an HTTP error of the OpenAI-compatible
        API, and the data of its mid-stream error event. ``code`` is the bridge's own code."""
        return {
            "error": {
                "message": self.message,
                "type": openai_error_type(self.status),
                "code": self.code,
                "param": self.param,
            }
        }

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


# An HTTP status -> the ``type`` of an OpenAI error body; any other 4xx is "invalid_request_error",
# any 5xx "server_error". The OpenAI SDKs pick their exception class by the status, not by this.
OPENAI_ERROR_TYPES: dict[int, str] = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


def openai_error_type(status: int) -> str:
    return OPENAI_ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


class BadRequest(BridgeError):
    status = 400
    default_code = "INVALID_REQUEST"


class Unauthorized(BridgeError):
    status = 401
    default_code = "UNAUTHORIZED"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="bali-zero"', **super().headers()}


class Forbidden(BridgeError):
    status = 403
    default_code = "FORBIDDEN"


class NotFound(BridgeError):
    status = 404
    default_code = "NOT_FOUND"


class MethodNotAllowed(BridgeError):
    status = 405
    default_code = "METHOD_NOT_ALLOWED"


class StreamExpired(BridgeError):
    """A resume that cannot be served: the stream is over, unknown, or its frames are gone.

    Always answered as a whole event stream of one ``error`` frame (not retryable), so an
    EventSource stops reconnecting; 410 is what it would be over plain HTTP.
    """

    status = 410
    default_code = "STREAM_EXPIRED"


class RequestHeadTimeout(BridgeError):
    """The request head did not arrive within HEADER_TIMEOUT_S (slowloris)."""

    status = 408
    default_code = "HEADER_TIMEOUT"


class RequestBodyTimeout(BridgeError):
    """The request body (a chunked body's trailers included) did not arrive within BODY_TIMEOUT_S.

    Counted from the end of the head: without it a client trickling its body a byte at a time
    (slowloris on the body) holds its connection, and the handler waiting for the body, for as
    long as it likes.
    """

    status = 408
    default_code = "BODY_TIMEOUT"


class ClientDisconnected(BridgeError):
    """The client went away before its request body was complete; nobody reads the answer.

    Typed so that it is not an "unhandled error": without it, a client that closed mid-body (or
    was closed by the connection's limits) would log a traceback at ERROR and a 500 be attempted.
    """

    status = 400
    default_code = "CLIENT_DISCONNECTED"


class PayloadTooLarge(BridgeError):
    status = 413
    default_code = "PAYLOAD_TOO_LARGE"


class UnsupportedMediaType(BridgeError):
    status = 415
    default_code = "UNSUPPORTED_MEDIA_TYPE"


class RequestHeadTooLarge(BridgeError):
    """Request line plus headers over MAX_HEADER_BYTES, as counted on the wire or by the app."""

    status = 431
    default_code = "HEADERS_TOO_LARGE"


class TooManyRequests(BridgeError):
    status = 429
    default_code = "RATE_LIMITED"


class ServiceUnavailable(BridgeError):
    status = 503
    default_code = "UPSTREAM_UNAVAILABLE"


class ResumeStoreUnavailable(ServiceUnavailable):
    """The shared resume store (Redis) could not be asked; retryable, the owner may still serve."""

    default_code = "RESUME_UNAVAILABLE"


class OwnerUnreachable(ServiceUnavailable):
    """A cross-instance stop that no subscriber received (PUBLISH counted zero receivers).

    Answered as a retryable 503 instead of 204: the owner's cancel subscriber may still be in its
    reconnect backoff after a Redis outage, and a 204 would promise a stop that never happens.
    """

    default_code = "OWNER_UNREACHABLE"


class UpstreamError(BridgeError):
    """The RAG service ended a call with a non-OK gRPC status."""

    status = 502
    default_code = "UPSTREAM_ERROR"


class Rejected(Exception):
    """A gate refusal carrying the headers and identity the response and audit need."""

    def __init__(self, error: BridgeError, headers: dict[str, str], identity: Identity) -> None:
        super().__init__(error.message)
        self.error = error
        self.headers = headers
        self.identity = identity


class ClientGone(Exception):
    """The HTTP client disconnected or stopped reading for longer than SEND_TIMEOUT_S."""


class ConfigError(ValueError):
    """A setting has a value the bridge cannot run with; the message names the variable."""


class UnsafeFile(ConfigError):
    """A file the bridge trusts, or a directory on its way, that another user could choose or read.

    A symlink, not a regular file, owned by another user, or in a directory others can write
    (bridge/safefiles.py). The message names the path and the fix; like any ConfigError it stops
    the bridge and the ``audit`` commands with one line and exit 2.
    """


class UnsupportedUvicorn(ConfigError):
    """The installed uvicorn is not one the bridge's connection protocol was tested with.

    Its version is outside the supported range, or a private name the bridge overrides, calls or
    reads is gone: serving anyway would fail mid-request with an AttributeError, or run without the
    head limits. The message (one line) names the version, the range and the missing names.
    """


class FrameError(ValueError):
    """A field value that would corrupt the stream (an id with CR, LF or NUL, a bad event name)."""


# gRPC status -> (code, HTTP status before the stream starts, retryable). The only such table.
GRPC_STATUS_MAP: dict[grpc.StatusCode, tuple[str, int, bool]] = {
    grpc.StatusCode.INVALID_ARGUMENT: ("INVALID_REQUEST", 400, False),
    grpc.StatusCode.OUT_OF_RANGE: ("INVALID_REQUEST", 400, False),
    grpc.StatusCode.FAILED_PRECONDITION: ("INVALID_REQUEST", 400, False),
    grpc.StatusCode.UNAUTHENTICATED: ("UPSTREAM_UNAUTHENTICATED", 502, False),
    grpc.StatusCode.PERMISSION_DENIED: ("FORBIDDEN", 403, False),
    grpc.StatusCode.NOT_FOUND: ("NOT_FOUND", 404, False),
    grpc.StatusCode.RESOURCE_EXHAUSTED: ("UPSTREAM_OVERLOADED", 503, True),
    grpc.StatusCode.UNAVAILABLE: ("UPSTREAM_UNAVAILABLE", 503, True),
    grpc.StatusCode.DEADLINE_EXCEEDED: ("UPSTREAM_TIMEOUT", 504, True),
    grpc.StatusCode.ABORTED: ("UPSTREAM_ABORTED", 503, True),
    grpc.StatusCode.CANCELLED: ("UPSTREAM_CANCELLED", 503, True),
    grpc.StatusCode.UNIMPLEMENTED: ("UPSTREAM_UNIMPLEMENTED", 502, False),
    grpc.StatusCode.INTERNAL: ("UPSTREAM_INTERNAL", 502, True),
    grpc.StatusCode.DATA_LOSS: ("UPSTREAM_INTERNAL", 502, False),
    grpc.StatusCode.UNKNOWN: ("UPSTREAM_ERROR", 502, True),
}

# Bridge code -> the one message a client ever reads for it. gRPC's details carry the upstream's
# address ("ipv4:127.0.0.1:41397"), the C core's debug text and whatever the RAG service chose
# to say; passed on, they mapped the network behind the bridge for any caller. They go to the log.
CLIENT_MESSAGES: dict[str, str] = {
    "INVALID_REQUEST": "the RAG service refused the request as invalid",
    "UPSTREAM_UNAUTHENTICATED": "the bridge could not authenticate to the RAG service",
    "FORBIDDEN": "the RAG service refused the request",
    "NOT_FOUND": "the RAG service does not know what was asked for",
    "UPSTREAM_OVERLOADED": "the RAG service is overloaded; retry shortly",
    "UPSTREAM_UNAVAILABLE": "the RAG service is unavailable; retry shortly",
    "UPSTREAM_TIMEOUT": "the RAG service did not answer in time; retry",
    "UPSTREAM_ABORTED": "the RAG service aborted the answer; retry",
    "UPSTREAM_CANCELLED": "the RAG service cancelled the answer; retry",
    "UPSTREAM_UNIMPLEMENTED": "the RAG service does not support this request",
    "UPSTREAM_INTERNAL": "the RAG service failed",
    "UPSTREAM_ERROR": "the RAG service failed",
}

upstream_log = logging.getLogger("bridge.upstream")
_MAX_LOGGED_DETAILS = 2048  # the upstream chooses the details' size; a log line must stay bounded


def from_grpc_status(code: grpc.StatusCode, details: str | None, request_id: str = "") -> BridgeError:
    """Translate a gRPC status into the bridge's error: a stable message, the details logged.

    The client sees only ``CLIENT_MESSAGES[code]``; the upstream's own details (addresses, ports,
    debug strings) are logged at WARNING with the request id, where operators look for them.
    """
    mapped_code, status, retryable = GRPC_STATUS_MAP.get(code, ("UPSTREAM_ERROR", 502, True))
    upstream_log.warning(
        "upstream call failed",
        extra={
            "request_id": request_id,
            "grpc_status": code.name,
            "grpc_details": (details or "")[:_MAX_LOGGED_DETAILS],
            "error_code": mapped_code,
        },
    )
    retry_after = 1.0 if retryable and status == 503 else None
    cls: type[BridgeError] = BadRequest if status == 400 else UpstreamError
    return cls(
        CLIENT_MESSAGES[mapped_code], code=mapped_code, retryable=retryable, retry_after_s=retry_after, status=status
    )


class AuditChainBroken(Exception):
    """The audit chain does not verify, so retention refuses to purge.

    Not an HTTP error: it stops ``audit purge`` (exit 1) and the bridge's scheduled purge (logged
    CRITICAL). Purging a chain that does not verify would delete the evidence and write a valid
    checkpoint over it (the backdated-``ts`` attack).
    """

    def __init__(self, first_bad_id: int | None, reason: str) -> None:
        super().__init__(f"the audit chain does not verify at record {first_bad_id}: {reason}")
        self.first_bad_id = first_bad_id
        self.reason = reason


class DoctorError(Exception):
    """``bali-zero-bridge doctor`` could not run its check (exit 2): the message says what to look at."""


# ------------------------------------------------------------------------------- as HTTP responses
class JSONResponse(Response):
    """UTF-8 JSON. A lone surrogate in a string (legal JSON, read back from a stored record) is
    written as its ``\\uXXXX`` escape: strict UTF-8 encoding would raise, turning the answer into a 500."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "backslashreplace")


def error_response(error: BridgeError, headers: Mapping[str, str] | None = None) -> JSONResponse:
    merged = {**(headers or {}), **error.headers()}
    return JSONResponse(error.body(), status_code=error.status, headers=merged)
