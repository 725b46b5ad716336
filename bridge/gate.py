"""Admission: who the caller is and whether they may make this request now.

Both chat endpoints pass through the same gate, in this order: shutting down (503), identity
(401), rate limit (429 + Retry-After). The rate-limit headers of the decision are returned so
every response, successful or not, carries them.

A header that names the caller is read only when it is unambiguous. Starlette's
``headers.get`` returns the first of several copies, so an empty ``Authorization`` followed by a
bad one was served as anonymous, and a proxy that appends its ``x-user-id`` after a client's
would let the client's copy win. Several ``Authorization`` headers are a 401 and several
``x-user-id`` headers from a trusted proxy a 400: the bridge refuses rather than picks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from starlette.requests import Request

from bridge.auth import Authenticator
from bridge.clientip import client_ip
from bridge.config import Settings
from bridge.errors import BadRequest, BridgeError, Rejected, ServiceUnavailable, Unauthorized
from bridge.ratelimit import RateDecision, RateLimiter
from bridge.types import Identity

AuthFailureHook = Callable[[Request, str, BridgeError], None]
RejectionHook = Callable[[Request, Identity, BridgeError], None]


@dataclass(slots=True)
class Admission:
    identity: Identity
    headers: dict[str, str]


class Gate:
    def __init__(
        self,
        settings: Settings,
        authenticator: Authenticator,
        limiter: RateLimiter,
        on_auth_failure: AuthFailureHook | None = None,
        on_rejected: RejectionHook | None = None,
    ) -> None:
        self.settings = settings
        self.authenticator = authenticator
        self.limiter = limiter
        self.on_auth_failure = on_auth_failure
        self.on_rejected = on_rejected
        self.draining = False

    def client(self, request: Request) -> tuple[str, bool]:
        peer = request.client.host if request.client else None
        forwarded = ",".join(request.headers.getlist("x-forwarded-for")) or None
        return client_ip(peer, forwarded, self.settings.trusted_proxies)

    async def identify(self, request: Request) -> Identity:
        ip, trusted = self.client(request)
        try:
            authorization = _single(request, "authorization")
            x_user_id = _single(request, "x-user-id") if trusted else None
            return await self.authenticator.authenticate(authorization, x_user_id, ip, trusted)
        except (Unauthorized, BadRequest) as exc:
            if self.on_auth_failure is not None:
                self.on_auth_failure(request, ip, exc)
            raise

    async def admit(self, request: Request) -> Admission:
        if self.draining:
            raise ServiceUnavailable(
                "the bridge is shutting down", code="SHUTTING_DOWN", retryable=True, retry_after_s=1
            )
        identity = await self.identify(request)
        decision: RateDecision = await self.limiter.hit(identity.key)
        headers = decision.headers()
        error: BridgeError | None = decision.error()
        if error is not None:
            if self.on_rejected is not None:
                self.on_rejected(request, identity, error)
            raise Rejected(error, headers, identity)
        return Admission(identity, headers)


def _single(request: Request, name: str) -> str | None:
    """The one value of header ``name``, None when absent; several copies are refused, not picked."""
    values = request.headers.getlist(name)
    if len(values) <= 1:
        return values[0] if values else None
    if name == "authorization":
        raise Unauthorized("send one Authorization header, not several", code="INVALID_TOKEN")
    raise BadRequest(f"several {name} headers; send at most one", code="DUPLICATE_HEADER")
