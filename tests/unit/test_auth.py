"""Bearer-token verification with real keys (HS256 secret, RSA key pair, JWKS over real HTTP)."""

from __future__ import annotations

import base64
import hmac
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from hashlib import sha256
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from bridge.auth import MAX_TOKEN_BYTES, Authenticator, effective_role, valid_user_id
from bridge.config import Settings
from bridge.errors import ServiceUnavailable, Unauthorized
from bridge.types import Identity

SECRET = "s3cret-for-tests-that-is-at-least-32-bytes-long"
IP = "203.0.113.7"
BASE = Settings()


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def public_pem(rsa_key: rsa.RSAPrivateKey) -> bytes:
    return rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture
def pem_file(tmp_path: Path, public_pem: bytes) -> str:
    path = tmp_path / "public.pem"
    path.write_bytes(public_pem)
    return str(path)


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "user-1", "iat": now, "exp": now + 300, **extra}


def hs(payload: dict[str, Any], key: str = SECRET) -> str:
    return jwt.encode(payload, key, algorithm="HS256")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_signed_hs256(payload: dict[str, Any], key: bytes) -> str:
    """An HS256 token signed by hand: pyjwt refuses to use a PEM key as an HMAC secret."""
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    signing_input = f"{header}.{b64(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64(hmac.new(key, signing_input.encode(), sha256).digest())}"


async def reject(auth: Authenticator, token: str) -> Unauthorized:
    with pytest.raises(Unauthorized) as info:
        await auth.authenticate(f"Bearer {token}", None, IP, False)
    assert token not in info.value.message and (len(token) < 8 or token[:8] not in info.value.message)
    return info.value


async def test_hs256_token_gives_verified_identity() -> None:
    auth = Authenticator(replace(BASE, jwt_secret=SECRET))
    ident = await auth.authenticate(f"Bearer {hs(claims(role='member', email='a@example.com'))}", "spoofed", IP, True)
    assert ident == Identity(client_ip=IP, user_id="user-1", role="member", email="a@example.com", authenticated=True)


async def test_rs256_token_from_public_key_file(rsa_key: rsa.RSAPrivateKey, pem_file: str) -> None:
    auth = Authenticator(replace(BASE, jwt_public_key_file=pem_file))
    token = jwt.encode(claims(roles=["external", "admin", "member", "wizard"]), rsa_key, algorithm="RS256")
    ident = await auth.authenticate(f"Bearer {token}", None, IP, False)
    assert (ident.user_id, ident.role, ident.authenticated) == ("user-1", "admin", True)


async def test_alg_none_rejected(pem_file: str) -> None:
    unsigned = jwt.encode(claims(), "", algorithm="none")
    for s in (replace(BASE, jwt_secret=SECRET), replace(BASE, jwt_public_key_file=pem_file)):
        err = await reject(Authenticator(s), unsigned)
        assert err.code == "INVALID_TOKEN"


async def test_key_confusion_rejected(public_pem: bytes, pem_file: str) -> None:
    """HS256 signed with the RSA public key (which the attacker knows) must not verify."""
    forged = hand_signed_hs256(claims(role="admin"), public_pem)
    err = await reject(Authenticator(replace(BASE, jwt_public_key_file=pem_file)), forged)
    assert err.message == "token algorithm is not accepted"


async def test_rs256_token_rejected_when_only_secret_configured(rsa_key: rsa.RSAPrivateKey) -> None:
    token = jwt.encode(claims(), rsa_key, algorithm="RS256")
    await reject(Authenticator(replace(BASE, jwt_secret=SECRET)), token)


@pytest.mark.parametrize(
    ("payload", "code", "message"),
    [
        ({"exp": int(time.time()) - 3600}, "TOKEN_EXPIRED", "token has expired"),
        ({"nbf": int(time.time()) + 3600}, "INVALID_TOKEN", "token is not yet valid"),
        ({"iat": int(time.time()) + 3600}, "INVALID_TOKEN", "token is not yet valid"),
        ({"aud": "someone-else"}, "INVALID_TOKEN", "token audience is not accepted"),
        ({"iss": "https://evil.example"}, "INVALID_TOKEN", "token issuer is not accepted"),
        ({"iss": None}, "INVALID_TOKEN", "token is missing the iss claim"),
        ({"exp": None}, "INVALID_TOKEN", "token is missing the exp claim"),
        ({"sub": None}, "INVALID_TOKEN", "token is missing the sub claim"),
    ],
)
async def test_bad_claims_rejected(payload: dict[str, Any], code: str, message: str) -> None:
    s = replace(BASE, jwt_secret=SECRET, jwt_audience="bali-zero", jwt_issuer="https://issuer.example")
    body = {**claims(aud="bali-zero", iss="https://issuer.example"), **payload}
    token = hs({k: v for k, v in body.items() if v is not None})
    err = await reject(Authenticator(s), token)
    assert (err.code, err.message) == (code, message)


async def test_aud_and_iss_not_checked_when_not_configured() -> None:
    auth = Authenticator(replace(BASE, jwt_secret=SECRET))
    token = hs(claims(aud="anything", iss="anyone"))
    assert (await auth.authenticate(f"Bearer {token}", None, IP, False)).authenticated


async def test_token_ignored_when_verification_not_configured() -> None:
    ident = await Authenticator(BASE).authenticate(f"Bearer {hs(claims(role='admin'))}", "bob", IP, True)
    assert ident == Identity(client_ip=IP, user_id="bob")


async def test_leeway_accepts_slightly_expired() -> None:
    auth = Authenticator(replace(BASE, jwt_secret=SECRET, jwt_leeway_s=30))
    token = hs(claims(exp=int(time.time()) - 5))
    assert (await auth.authenticate(f"Bearer {token}", None, IP, False)).authenticated


@pytest.mark.parametrize("token", ["garbage", "a.b.c", "eyJhbGciOiJIUzI1NiJ9..", "Ünïcödé.x.y"])
async def test_garbage_rejected(token: str) -> None:
    await reject(Authenticator(replace(BASE, jwt_secret=SECRET)), token)


async def test_wrong_signature_rejected() -> None:
    forged = hs(claims(), "another-secret-32-bytes-long-xxxxx")
    err = await reject(Authenticator(replace(BASE, jwt_secret=SECRET)), forged)
    assert err.message == "token signature is invalid"


async def test_oversized_token_rejected_before_decoding() -> None:
    token = hs(claims(pad="x" * 10 * 1024))
    assert len(token) > MAX_TOKEN_BYTES
    err = await reject(Authenticator(replace(BASE, jwt_secret=SECRET)), token)
    assert err.message == "token is too large"


async def test_non_bearer_scheme_rejected() -> None:
    auth = Authenticator(replace(BASE, jwt_secret=SECRET))
    for header in ("Basic dXNlcjpwYXNz", "Bearer", "Bearer   "):
        with pytest.raises(Unauthorized):
            await auth.authenticate(header, None, IP, False)


async def test_missing_token() -> None:
    optional = Authenticator(replace(BASE, jwt_secret=SECRET))
    assert await optional.authenticate(None, None, IP, False) == Identity(client_ip=IP)
    required = Authenticator(replace(BASE, jwt_secret=SECRET, auth_required=True))
    with pytest.raises(Unauthorized) as info:
        await required.authenticate(None, None, IP, False)
    assert info.value.code == "UNAUTHORIZED" and info.value.status == 401


async def test_x_user_id_only_from_trusted_proxy_for_anonymous() -> None:
    auth = Authenticator(replace(BASE, jwt_secret=SECRET))
    assert (await auth.authenticate(None, "alice", IP, False)).user_id is None
    trusted = await auth.authenticate(None, "alice", IP, True)
    assert (trusted.user_id, trusted.role, trusted.authenticated) == ("alice", None, False)
    assert (await auth.authenticate(None, "bad\nid", IP, True)).user_id is None
    token_user = await auth.authenticate(f"Bearer {hs(claims())}", "alice", IP, True)
    assert token_user.user_id == "user-1"


async def test_proxy_asserted_and_token_identities_never_share_a_key() -> None:
    auth = Authenticator(replace(BASE, jwt_secret=SECRET))
    proxied = await auth.authenticate(None, "user-1", IP, True)
    verified = await auth.authenticate(f"Bearer {hs(claims())}", None, IP, False)
    anonymous = await auth.authenticate(None, None, IP, False)
    assert [(i.kind, i.key) for i in (proxied, verified, anonymous)] == [
        ("proxy", "proxy:user-1"),
        ("token", "user:user-1"),
        ("anonymous", f"ip:{IP}"),
    ]
    # A user id without a verified token can only ever be the weaker kind.
    assert Identity(client_ip=IP, user_id="user-1").key == "proxy:user-1"


@pytest.mark.parametrize("header", ["", "   ", "\t"])
async def test_empty_or_blank_authorization_is_401_not_anonymous(header: str) -> None:
    auth = Authenticator(replace(BASE, jwt_secret=SECRET))
    with pytest.raises(Unauthorized) as info:
        await auth.authenticate(header, "alice", IP, True)
    assert info.value.code == "INVALID_TOKEN"


async def test_role_and_email_only_from_verified_well_formed_claims() -> None:
    auth = Authenticator(replace(BASE, jwt_secret=SECRET))
    ident = await auth.authenticate(f"Bearer {hs(claims(role=['admin'], email=42))}", None, IP, False)
    assert (ident.role, ident.email) == (None, None)
    token = hs(claims(role="Member", roles=["external"]))
    ident = await auth.authenticate(f"Bearer {token}", None, IP, False)
    assert ident.role == "member"


POISONED_USER_IDS = [
    "a\ud800",  # lone surrogate: legal JSON, not UTF-8
    "\udfff\ud800",
    "alice\x00x",  # NUL: SQLite's JSON functions end the string there
    "a\nb",
    "tab\tid",
    "\u202eevil",  # right-to-left override
    "zero\u200bwidth",
    "x" * 129,
]


@pytest.mark.parametrize("sub", [*POISONED_USER_IDS, " alice", "alice ", "   ", ""])
async def test_token_subject_is_held_to_the_user_id_rule(sub: str) -> None:
    auth = Authenticator(replace(BASE, jwt_secret=SECRET))
    err = await reject(auth, hs(claims(sub=sub)))
    assert err.code == "INVALID_TOKEN"
    assert err.message == "token subject must be 1 to 128 printable characters without surrounding spaces"
    assert not valid_user_id(sub)


@pytest.mark.parametrize("user_id", POISONED_USER_IDS)
async def test_proxy_user_id_is_held_to_the_same_rule(user_id: str) -> None:
    auth = Authenticator(replace(BASE, jwt_secret=SECRET))
    assert (await auth.authenticate(None, user_id, IP, True)).user_id is None
    assert (await auth.authenticate(None, f"  {user_id} ", IP, True)).user_id is None


@pytest.mark.parametrize("sub", ["user-1", "zoë", "auth0|5f3c9a", "Alice Smith", "用户", "a@b.example", "x" * 128])
async def test_printable_subjects_of_any_script_are_accepted(sub: str) -> None:
    auth = Authenticator(replace(BASE, jwt_secret=SECRET))
    assert valid_user_id(sub)
    assert (await auth.authenticate(f"Bearer {hs(claims(sub=sub))}", None, IP, False)).user_id == sub
    assert (await auth.authenticate(None, f" {sub}  ", IP, True)).user_id == sub  # a header's spaces are trimmed


@pytest.mark.parametrize("email", ["a\ud800@example.com", "a\x00@example.com", "a\n@example.com"])
async def test_unprintable_email_claim_is_dropped_not_stored(email: str) -> None:
    auth = Authenticator(replace(BASE, jwt_secret=SECRET))
    ident = await auth.authenticate(f"Bearer {hs(claims(email=email))}", None, IP, False)
    assert (ident.user_id, ident.email) == ("user-1", None)


def test_effective_role_narrows_never_raises() -> None:
    admin = Identity(client_ip=IP, user_id="u", role="admin", authenticated=True)
    member = replace(admin, role="member")
    assert effective_role(admin, None) == "admin"
    assert effective_role(admin, "member") == "member"
    assert effective_role(admin, "external") == "external"
    assert effective_role(member, "admin") == "member"
    assert effective_role(member, "superuser") == "member"
    assert effective_role(Identity(client_ip=IP), "admin") is None
    assert effective_role(Identity(client_ip=IP), "external") is None


# --- JWKS over a real loopback HTTP server -------------------------------------------------------


class JwksServer:
    def __init__(self, jwks: dict[str, Any]) -> None:
        body = json.dumps(jwks).encode()
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/.well-known/jwks.json"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def jwks_server(rsa_key: rsa.RSAPrivateKey) -> Iterator[JwksServer]:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key()))
    server = JwksServer({"keys": [{**jwk, "kid": "k1", "use": "sig", "alg": "RS256"}]})
    yield server
    server.close()


async def test_jwks_token_accepted_and_keys_cached(rsa_key: rsa.RSAPrivateKey, jwks_server: JwksServer) -> None:
    auth = Authenticator(replace(BASE, jwt_jwks_url=jwks_server.url))
    for _ in range(3):
        token = jwt.encode(claims(roles=["member"]), rsa_key, algorithm="RS256", headers={"kid": "k1"})
        ident = await auth.authenticate(f"Bearer {token}", None, IP, False)
        assert (ident.user_id, ident.role) == ("user-1", "member")
    assert jwks_server.requests == 1


async def test_jwks_rejects_unknown_kid_and_wrong_key(jwks_server: JwksServer) -> None:
    auth = Authenticator(replace(BASE, jwt_jwks_url=jwks_server.url))
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    await reject(auth, jwt.encode(claims(), other, algorithm="RS256", headers={"kid": "nope"}))
    await reject(auth, jwt.encode(claims(), other, algorithm="RS256", headers={"kid": "k1"}))
    await reject(auth, hs(claims()))


async def test_jwks_unreachable_is_503_not_401(rsa_key: rsa.RSAPrivateKey) -> None:
    server = JwksServer({"keys": []})
    url = server.url
    server.close()
    auth = Authenticator(replace(BASE, jwt_jwks_url=url))
    token = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "k1"})
    with pytest.raises(ServiceUnavailable) as info:
        await auth.authenticate(f"Bearer {token}", None, IP, False)
    assert info.value.code == "AUTH_UNAVAILABLE"
