"""Who is calling: bearer-token verification and the roles a request may use.

Invariants, each closing a known hole:

* The accepted algorithms are pinned per key type (HS256 with a secret, RS256 with a public key or
  JWKS). The token's own ``alg`` header never chooses, so ``alg: none`` and "key confusion" (an
  HS256 token signed with the RSA *public* key as the HMAC secret) are rejected.
* ``exp`` is required; an unexpiring token leaked once would be valid forever.
* Oversized tokens are refused before any base64/JSON work, so a huge header costs nothing.
* ``user_id``, ``role`` and ``email`` come only from verified claims. ``x-user-id`` is believed
  only from a trusted proxy and only for callers without a token, so a client cannot pick its id;
  even then it is a ``proxy`` identity with its own key space, never the token user of that name.
* A user id, from a token's ``sub`` or from a proxy, is 1..128 printable characters
  (``valid_user_id``). A bad ``sub`` is a 401, never served: the id is written to the audit trail,
  the resume store and the logs, and a lone surrogate (legal JSON) or a NUL in it would poison them.
* A present Authorization header is always used or refused, never skipped: an empty one is a
  401 like any bad token (the gate refuses several of them, see bridge/gate.py).
* JWKS fetches are blocking HTTP in pyjwt; they run in a worker thread so a slow key server
  stalls only the requests that need it, never the event loop.
* Error messages are fixed strings: the token (or pyjwt's text about it) never reaches a client.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from bridge.config import Settings
from bridge.errors import ConfigError, ServiceUnavailable, Unauthorized
from bridge.types import Identity

log = logging.getLogger(__name__)

MAX_TOKEN_BYTES = 8 * 1024
ROLE_RANK: Mapping[str, int] = {"external": 0, "member": 1, "admin": 2}
_MAX_USER_ID_CHARS = 128
_MAX_EMAIL_CHARS = 320


class Authenticator:
    """Turns the ``Authorization`` and ``x-user-id`` headers into an :class:`Identity`.

    ``jwks_timeout_s`` bounds one JWKS fetch; ``jwks_lifespan_s`` is how long a fetched key set is
    cached (pyjwt also rate-limits forced refreshes for unknown ``kid`` values, so random kids
    cannot turn the bridge into a flood against the key server).
    """

    def __init__(self, settings: Settings, *, jwks_timeout_s: float = 5.0, jwks_lifespan_s: float = 300.0) -> None:
        self._required = settings.auth_required
        self._leeway = settings.jwt_leeway_s
        self._audience = settings.jwt_audience or None
        self._issuer = settings.jwt_issuer or None
        self._key: str | RSAPublicKey | None = None
        self._jwks: jwt.PyJWKClient | None = None
        self._algorithms: list[str] = []
        if settings.jwt_secret:
            self._key, self._algorithms = settings.jwt_secret, ["HS256"]
            if len(settings.jwt_secret.encode()) < 32:  # RFC 7518 3.2: at least the hash size
                log.warning("JWT_SECRET is shorter than 32 bytes; HS256 tokens can be brute-forced")
        elif settings.jwt_public_key_file:
            self._key, self._algorithms = _load_rsa_public_key(settings.jwt_public_key_file), ["RS256"]
        elif settings.jwt_jwks_url:
            self._jwks = jwt.PyJWKClient(
                settings.jwt_jwks_url,
                cache_keys=True,
                cache_jwk_set=True,
                lifespan=jwks_lifespan_s,
                timeout=jwks_timeout_s,
            )
            self._algorithms = ["RS256"]

    @property
    def configured(self) -> bool:
        """Whether tokens can be verified at all."""
        return bool(self._algorithms)

    async def authenticate(
        self, authorization: str | None, x_user_id: str | None, client_ip: str, peer_trusted: bool
    ) -> Identity:
        """Verify the caller. Raises Unauthorized for a bad token or a missing required one.

        With no verification configured (AUTH_REQUIRED must then be false) the Authorization
        header is ignored rather than trusted: the caller is anonymous.
        """
        token = _bearer_token(authorization) if self.configured else None
        if token is not None:
            claims = await self._verify(token)
            return _identity_from_claims(claims, client_ip)
        if self._required:
            raise Unauthorized("authentication required", code="UNAUTHORIZED")
        user_id = _clean_user_id(x_user_id) if peer_trusted else None
        return Identity(client_ip=client_ip, user_id=user_id)

    async def _verify(self, token: str) -> dict[str, Any]:
        if len(token.encode("utf-8", "surrogatepass")) > MAX_TOKEN_BYTES:
            raise _invalid("token is too large")
        key: Any = self._key
        try:
            if self._jwks is not None:
                key = (await asyncio.to_thread(self._jwks.get_signing_key_from_jwt, token)).key
            required = ["exp", "sub"] + ["aud"] * bool(self._audience) + ["iss"] * bool(self._issuer)
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=self._algorithms,
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": required, "verify_aud": self._audience is not None},
            )
        except jwt.PyJWKClientConnectionError:
            log.warning("JWKS endpoint unreachable; cannot verify tokens")
            raise ServiceUnavailable(
                "token keys are unavailable, try again shortly",
                code="AUTH_UNAVAILABLE",
                retryable=True,
                retry_after_s=5,
            ) from None
        except jwt.PyJWTError as exc:
            raise _translate(exc) from None
        return claims


def effective_role(identity: Identity, requested: str | None) -> str | None:
    """The role a request acts with: the verified role, optionally narrowed by ``user_role``.

    A request may ask for *less* than it was granted (an admin previewing as member), never more;
    an unknown or higher role, or any role without a verified one, is ignored.
    """
    granted = identity.role
    if granted is None or requested is None:
        return granted
    wanted = requested.strip().lower()
    if wanted in ROLE_RANK and ROLE_RANK[wanted] <= ROLE_RANK.get(granted, -1):
        return wanted
    return granted


def _bearer_token(authorization: str | None) -> str | None:
    """The bearer token, None when the header is absent; a present but unusable one is a 401.

    An empty or blank header is not "no header": read as absent, an empty Authorization sent
    beside a bad one let a caller be served as anonymous where a bad token must be a 401.
    """
    if authorization is None:
        return None
    if not authorization.strip():
        raise Unauthorized("the Authorization header is empty", code="INVALID_TOKEN")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("expected an Authorization: Bearer token", code="INVALID_TOKEN")
    return token.strip()


def valid_user_id(value: str) -> bool:
    """Whether ``value`` may name a user: 1..128 printable characters, not starting or ending with a space.

    The one rule for a token's ``sub`` and a trusted proxy's ``x-user-id``. ``isprintable`` refuses
    what the places a user id is written to cannot hold unchanged: a lone surrogate such as
    ``"a\\ud800"`` (legal in JSON, not encodable as UTF-8) would become an audit index entry no
    reader can decode; NUL ends a string inside SQLite, so ``"alice\\u0000x"`` would be indexed as
    the user ``alice``; other control characters forge log lines.
    """
    return 0 < len(value) <= _MAX_USER_ID_CHARS and value.isprintable() and value == value.strip()


def _identity_from_claims(claims: Mapping[str, Any], client_ip: str) -> Identity:
    sub = claims.get("sub")
    if not isinstance(sub, str) or not valid_user_id(sub):
        raise _invalid(
            f"token subject must be 1 to {_MAX_USER_ID_CHARS} printable characters without surrounding spaces"
        )
    return Identity(
        client_ip=client_ip,
        user_id=sub,
        role=_highest_role(claims),
        email=_email(claims.get("email")),
        authenticated=True,
    )


def _highest_role(claims: Mapping[str, Any]) -> str | None:
    candidates: list[object] = [claims.get("role")]
    roles = claims.get("roles")
    if isinstance(roles, list):
        candidates.extend(roles)
    known = [c.lower() for c in candidates if isinstance(c, str) and c.lower() in ROLE_RANK]
    return max(known, key=ROLE_RANK.__getitem__, default=None)


def _email(value: object) -> str | None:
    if not isinstance(value, str) or not 3 <= len(value) <= _MAX_EMAIL_CHARS:
        return None
    return value if "@" in value and value.isprintable() else None


def _clean_user_id(value: str | None) -> str | None:
    """A proxy's ``x-user-id`` without the header's surrounding whitespace, or None if not ``valid_user_id``."""
    if value is None:
        return None
    value = value.strip()
    return value if valid_user_id(value) else None


def _invalid(message: str) -> Unauthorized:
    return Unauthorized(message, code="INVALID_TOKEN")


_MESSAGES: tuple[tuple[type[jwt.PyJWTError], str, str], ...] = (
    (jwt.ExpiredSignatureError, "TOKEN_EXPIRED", "token has expired"),
    (jwt.ImmatureSignatureError, "INVALID_TOKEN", "token is not yet valid"),
    (jwt.InvalidAudienceError, "INVALID_TOKEN", "token audience is not accepted"),
    (jwt.InvalidIssuerError, "INVALID_TOKEN", "token issuer is not accepted"),
    (jwt.InvalidAlgorithmError, "INVALID_TOKEN", "token algorithm is not accepted"),
    (jwt.InvalidSignatureError, "INVALID_TOKEN", "token signature is invalid"),
)


def _translate(exc: jwt.PyJWTError) -> Unauthorized:
    """A client-safe Unauthorized for a pyjwt failure (pyjwt's own text is logged, not shown)."""
    log.info("token rejected: %s", type(exc).__name__)
    if isinstance(exc, jwt.MissingRequiredClaimError) and exc.claim in {"exp", "sub", "aud", "iss"}:
        return _invalid(f"token is missing the {exc.claim} claim")
    for kind, code, message in _MESSAGES:
        if isinstance(exc, kind):
            return Unauthorized(message, code=code)
    return _invalid("token is invalid")


def _load_rsa_public_key(path: str) -> RSAPublicKey:
    try:
        key = load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"JWT_PUBLIC_KEY_FILE={path!r}: not a PEM public key ({exc})") from None
    if not isinstance(key, RSAPublicKey):
        raise ConfigError(f"JWT_PUBLIC_KEY_FILE={path!r}: expected an RSA public key for RS256")
    return key
