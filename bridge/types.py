"""Small types shared by the bridge's modules, kept here so modules do not import each other for them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

Outcome = Literal["completed", "cancelled", "error"]
IdentityKind = Literal["token", "proxy", "anonymous"]

# Why the bridge itself closed an HTTP connection (a metric label): a request head or body too
# large or too slow, or a connection idle between requests.
ConnectionCloseReason = Literal["header_too_large", "header_timeout", "body_timeout", "keepalive_idle"]
CONNECTION_CLOSE_REASONS: tuple[ConnectionCloseReason, ...] = (
    "header_too_large",
    "header_timeout",
    "body_timeout",
    "keepalive_idle",
)


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is calling, as far as the bridge can prove it.

    ``user_id`` and ``role`` come only from a verified token (or, for anonymous callers, an
    ``x-user-id`` set by a trusted proxy); nothing the client writes in the request body can
    change them. ``authenticated`` is True only for a verified token: a ``user_id`` without it
    was asserted by a proxy hop, which is a weaker claim (see :attr:`kind`).
    """

    client_ip: str
    user_id: str | None = None
    role: str | None = None
    email: str | None = None
    authenticated: bool = False

    @property
    def kind(self) -> IdentityKind:
        """How the caller is known: a verified token, a trusted proxy's ``x-user-id``, or only an IP.

        Derived, not stored, so a ``user_id`` without ``authenticated`` can only ever fall to the
        weaker ``proxy`` kind, never be mistaken for a verified one.
        """
        if self.authenticated and self.user_id:
            return "token"
        return "proxy" if self.user_id else "anonymous"

    @property
    def key(self) -> str:
        """The key for rate limits, stream caps, rollout and stream ownership.

        Each kind has its own key space (``user:``, ``proxy:``, ``ip:``). Sharing one let an
        anonymous caller behind nginx send ``x-user-id: alice`` and get the key of the verified
        token ``sub=alice``: resume and stop her streams, spend her rate limit, be audited as her.
        """
        if self.kind == "token":
            return f"user:{self.user_id}"
        if self.kind == "proxy":
            return f"proxy:{self.user_id}"
        return f"ip:{self.client_ip}"


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


class StreamObserver(Protocol):
    """Receives a stream's measurements; implemented by metrics and stats (bridge/telemetry.py)."""

    def stream_opened(self) -> None: ...

    def first_token(self, seconds: float) -> None: ...

    def token_gaps(self, seconds: Sequence[float]) -> None:
        """Inter-token gaps of one stream, in batches (a call per token is a measurable cost at full token rate)."""
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
