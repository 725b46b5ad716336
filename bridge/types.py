"""Small types shared by the bridge's modules, kept here so modules do not import each other for them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

Outcome = Literal["completed", "cancelled", "error"]


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is calling, as far as the bridge can prove it.

    ``user_id`` and ``role`` come only from a verified token (or, for anonymous callers, an
    ``x-user-id`` set by a trusted proxy); nothing the client writes in the request body can
    change them.
    """

    client_ip: str
    user_id: str | None = None
    role: str | None = None
    email: str | None = None
    authenticated: bool = False

    @property
    def key(self) -> str:
        """The key for rate limits, stream caps and rollout: the user if known, else the IP."""
        return f"user:{self.user_id}" if self.user_id else f"ip:{self.client_ip}"


@dataclass(slots=True)
class StreamResult:
    """How one stream ended, as measured by the bridge; feeds the done frame, metrics, logs and audit."""

    stream_id: str
    request_id: str
    outcome: Outcome
    tokens: int
    duration_ms: float
    first_token_ms: float | None
    error_code: str | None = None
    finish_reason: str | None = None
    trace_id: str | None = None
    extra: dict[str, object] = field(default_factory=dict)


class StreamObserver(Protocol):
    """Receives a stream's measurements; implemented by metrics and stats (bridge/telemetry.py)."""

    def stream_opened(self) -> None: ...

    def first_token(self, seconds: float) -> None: ...

    def token_gaps(self, seconds: Sequence[float]) -> None:
        """Inter-token gaps of one stream, in batches (a call per token cost ~7 us at full rate)."""
        ...

    def stream_closed(self, result: StreamResult) -> None: ...

    def reconnected(self) -> None: ...


class NullObserver:
    """An observer that records nothing."""

    def stream_opened(self) -> None:
        pass

    def first_token(self, seconds: float) -> None:
        pass

    def token_gaps(self, seconds: Sequence[float]) -> None:
        pass

    def stream_closed(self, result: StreamResult) -> None:
        pass

    def reconnected(self) -> None:
        pass
