"""Admission: who the caller is and whether they may make this request now.

Both chat endpoints pass through ``admit``, in this order: shutting down (503), identity (401),
rate limit (429 + Retry-After). The rate-limit headers of the decision are returned so every
response, successful or not, carries them. Resumes, cancels and admin reads pass through
``control``: identity, then CONTROL_RATE_LIMIT per caller (429 + Retry-After). It is a budget of
its own, so a client's reconnects never spend its chat limit, yet a flood of them (a resume of an
unknown id costs a Redis round trip) is refused.

A refused credential is charged to the client's address block (``address_block``: the address
as ``client_ip`` resolved it, an IPv6 /64) under AUTH_FAILURE_RATE_LIMIT *before* it is reported
for the audit trail; past that budget the answer is 429 TOO_MANY_AUTH_FAILURES instead of 401.
Only failures are counted: a valid credential from the same address is still served. Each
limiter has its own key space, so failures never spend the anonymous caller's request limit at
that address, and with Redis storage every instance counts against the same windows.

A header that names the caller is read only when it is unambiguous. Starlette's
``headers.get`` returns the first of several copies, so an empty ``Authorization`` followed by a
bad one would be served as anonymous, and a proxy that appends its ``x-user-id`` after a client's
would let the client's copy win. Several ``Authorization`` headers are a 401 and several
``x-user-id`` headers from a trusted proxy a 400: the bridge refuses rather than picks.

Streaming is rolled out by sticky percentage (``in_rollout``): a key is hashed (SHA-256, stable
across processes and restarts, unlike ``hash()``) into one of ``BUCKETS`` buckets and is in the
rollout when its bucket is below ``percent * 100``. Raising the percentage only adds buckets, so
users already streaming keep streaming, and a user does not flip between streaming and
non-streaming from one request or instance to the next.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from starlette.requests import Request

from bridge.auth import Authenticator
from bridge.clientip import address_block, client_ip, counting_key
from bridge.config import Settings
from bridge.errors import BadRequest, BridgeError, Rejected, ServiceUnavailable, TooManyRequests, Unauthorized
from bridge.ratelimit import RateDecision, RateLimiter
from bridge.types import Identity

AuthFailureHook = Callable[[Request, Identity, BridgeError], None]
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
        *,
        auth_failures: RateLimiter,
        control: RateLimiter,
        on_auth_failure: AuthFailureHook | None = None,
        on_rejected: RejectionHook | None = None,
    ) -> None:
        self.settings = settings
        self.authenticator = authenticator
        self.limiter = limiter
        self.auth_failures = auth_failures
        self.control_limiter = control
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
            raise await self.refuse(request, Identity(client_ip=ip), exc) from None

    async def refuse(self, request: Request, identity: Identity, error: BridgeError) -> BridgeError:
        """The answer to a refused credential: ``error``, or 429 once the address is over its budget.

        The address is charged first, then the refusal is reported (``on_auth_failure``), so
        nothing is written for a failure that was not counted. A limiter whose store is down
        leaves ``error`` as the answer: the request is refused either way.
        """
        decision = await self.auth_failures.hit(address_block(identity.client_ip))
        if self.on_auth_failure is not None:
            self.on_auth_failure(request, identity, error)
        if decision.allowed or decision.storage_error:
            return error
        return TooManyRequests(
            "too many failed authentication attempts from this address; try again later",
            code="TOO_MANY_AUTH_FAILURES",
            retryable=True,
            retry_after_s=decision.retry_after_s,
        )

    async def control(self, request: Request) -> Identity:
        """The identity of a resume, cancel or admin read, within CONTROL_RATE_LIMIT (else 429).

        Counted per ``counting_key``: an anonymous caller per address block, so cycling the
        addresses of an IPv6 /64 buys no further probes.
        """
        identity = await self.identify(request)
        decision = await self.control_limiter.hit(counting_key(identity))
        error = decision.error()
        if error is not None:
            if self.on_rejected is not None:
                self.on_rejected(request, identity, error)
            raise error
        return identity

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

    async def aclose(self) -> None:
        """Release every limiter's storage."""
        for limiter in (self.limiter, self.auth_failures, self.control_limiter):
            await limiter.aclose()


def _single(request: Request, name: str) -> str | None:
    """The one value of header ``name``, None when absent; several copies are refused, not picked."""
    values = request.headers.getlist(name)
    if len(values) <= 1:
        return values[0] if values else None
    if name == "authorization":
        raise Unauthorized("send one Authorization header, not several", code="INVALID_TOKEN")
    raise BadRequest(f"several {name} headers; send at most one", code="DUPLICATE_HEADER")


# ----------------------------------------------------------------------- sticky percentage rollout
BUCKETS = 10_000


def bucket(key: str, salt: str = "sse") -> int:
    """The key's bucket in ``0..BUCKETS-1``; ``salt`` keeps separate rollouts independent."""
    digest = hashlib.sha256(f"{salt}:{key}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def in_rollout(key: str, percent: float, salt: str = "sse") -> bool:
    """Whether ``key`` is inside a rollout of ``percent`` (0..100) per cent."""
    if percent >= 100:
        return True
    if percent <= 0:
        return False
    return bucket(key, salt) < round(percent * BUCKETS / 100)
