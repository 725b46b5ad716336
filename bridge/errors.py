"""Every failure the bridge reports, in one place.

Before a stream starts an error is an HTTP status with a JSON body
``{"error": {"code", "message"}}``; after it started it is an ``error`` SSE frame with
``code``, ``message`` and ``retryable``. Both come from the same ``BridgeError`` so a code means
the same thing on either path.

    BridgeError
    ├── BadRequest            400 INVALID_REQUEST / INVALID_JSON / QUERY_TOO_LONG / ...
    ├── Unauthorized          401 UNAUTHORIZED
    ├── Forbidden             403 FORBIDDEN
    ├── NotFound              404 NOT_FOUND / STREAMING_DISABLED / STREAM_NOT_FOUND
    ├── PayloadTooLarge       413 PAYLOAD_TOO_LARGE
    ├── UnsupportedMediaType  415 UNSUPPORTED_MEDIA_TYPE
    ├── TooManyRequests       429 RATE_LIMITED / TOO_MANY_STREAMS (+ Retry-After)
    ├── ServiceUnavailable    503 UPSTREAM_UNAVAILABLE / OVERLOADED / SHUTTING_DOWN (+ Retry-After)
    └── UpstreamError         mapped from a gRPC status by ``from_grpc_status``
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import grpc


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
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.retryable = retryable
        self.retry_after_s = retry_after_s
        if status is not None:
            self.status = status

    def body(self) -> dict[str, Any]:
        """The JSON body of an HTTP error response."""
        return {"error": {"code": self.code, "message": self.message}}

    def frame(self) -> dict[str, Any]:
        """The data of an ``error`` SSE frame."""
        return {"type": "error", "code": self.code, "message": self.message, "retryable": self.retryable}

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


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


class PayloadTooLarge(BridgeError):
    status = 413
    default_code = "PAYLOAD_TOO_LARGE"


class UnsupportedMediaType(BridgeError):
    status = 415
    default_code = "UNSUPPORTED_MEDIA_TYPE"


class TooManyRequests(BridgeError):
    status = 429
    default_code = "RATE_LIMITED"


class ServiceUnavailable(BridgeError):
    status = 503
    default_code = "UPSTREAM_UNAVAILABLE"


class UpstreamError(BridgeError):
    """The RAG service ended a call with a non-OK gRPC status."""

    status = 502
    default_code = "UPSTREAM_ERROR"


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


def from_grpc_status(code: grpc.StatusCode, details: str | None) -> BridgeError:
    """Translate a gRPC status into the bridge's error, keeping the upstream's message."""
    mapped_code, status, retryable = GRPC_STATUS_MAP.get(code, ("UPSTREAM_ERROR", 502, True))
    message = details or code.name.lower().replace("_", " ")
    retry_after = 1.0 if retryable and status == 503 else None
    cls: type[BridgeError] = BadRequest if status == 400 else UpstreamError
    return cls(message, code=mapped_code, retryable=retryable, retry_after_s=retry_after, status=status)
