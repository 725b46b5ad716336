"""GET /api/admin/audit: admins only, filters, pagination, chain status, and the read is itself audited."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route

from bridge.audit.http import admin_audit_endpoint
from bridge.audit.keys import derive_keys
from bridge.audit.refusals import RefusalLedger
from bridge.audit.store import QueryFilters, SQLiteStore
from bridge.audit.trail import AuditTrail
from bridge.errors import BridgeError, JSONResponse, Unauthorized
from bridge.types import Identity


async def authenticate(request: Request) -> Identity:
    """Test identities chosen by a header, standing in for the JWT gate."""
    who = request.headers.get("x-test-who", "")
    if who == "bad-token":
        raise Unauthorized("token expired", code="TOKEN_EXPIRED")
    if who == "admin":
        return Identity(
            client_ip="192.0.2.50", user_id="root", role="admin", email="ops@example.com", authenticated=True
        )
    if who == "member":
        return Identity(client_ip="192.0.2.51", user_id="m1", role="member", authenticated=True)
    return Identity(client_ip="192.0.2.52", role="admin")  # a role that was not verified


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[tuple[AuditTrail, httpx.AsyncClient]]:
    trail = AuditTrail(SQLiteStore(tmp_path / "audit.sqlite3"), derive_keys(b"h" * 32))
    await trail.start()
    anon = Identity(client_ip="203.0.113.77")
    for i in range(7):
        trail.record(trail.events.security("rate_limited", anon, f"rl{i}", None, "/x", "RATE_LIMITED"))
    await trail.flush()
    ledger = RefusalLedger(trail, 60)

    async def refuse(request: Request, identity: Identity, error: BridgeError) -> BridgeError:
        """Standing in for the gate's address budget: every refusal goes to a real ledger."""
        ledger.refused("auth_failed", identity, request_id="r", trace_id=None, path=request.url.path, reason=error.code)
        return error

    app = Starlette(routes=[Route("/api/admin/audit", admin_audit_endpoint(trail, authenticate, refuse))])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        yield trail, client
    await trail.aclose()


async def test_admin_reads_with_filters_pagination_and_chain_status(
    setup: tuple[AuditTrail, httpx.AsyncClient],
) -> None:
    trail, client = setup
    headers = {"x-test-who": "admin", "x-request-id": "req-1", "traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"}
    first = await client.get("/api/admin/audit", params={"ip": "203.0.113.77", "limit": "5"}, headers=headers)
    assert first.status_code == 200
    data = first.json()
    assert data["count"] == 5 and data["chain"]["ok"] is True and data["chain"]["checked"] == 7
    assert [r["request_id"] for r in data["records"]] == ["rl6", "rl5", "rl4", "rl3", "rl2"]
    second = await client.get(
        "/api/admin/audit", headers=headers, params={"event_type": "rate_limited", "cursor": str(data["next_cursor"])}
    )
    assert [r["request_id"] for r in second.json()["records"]] == ["rl1", "rl0"]
    assert second.json()["next_cursor"] is None

    await trail.flush()
    reads = await trail.query(QueryFilters(event_type="admin_read"))
    assert len(reads) == 2
    newest, oldest = reads[0].body, reads[1].body
    assert (oldest["request_id"], oldest["trace_id"], oldest["returned"]) == ("req-1", "a" * 32, 5)
    assert oldest["user_id"] == "root" and oldest["email"] == "ops@example.com"
    assert oldest["filters"] == {
        "user_id": trail.events.user_id(Identity(client_ip="203.0.113.77")),
        "limit": "5",
        "offset": "0",
    }
    assert "203.0.113.77" not in repr(oldest)  # the ip filter is stored pseudonymised
    assert newest["filters"]["event_type"] == "rate_limited"


@pytest.mark.parametrize(
    ("who", "status", "code"), [("member", 403, "FORBIDDEN"), ("unverified-admin", 401, "UNAUTHORIZED")]
)
async def test_non_admins_are_refused_and_the_attempt_is_recorded(
    setup: tuple[AuditTrail, httpx.AsyncClient],
    who: str,
    status: int,
    code: str,
) -> None:
    """Verified non-admin: 403. No verified identity (whatever role it claims): 401, authenticate first."""
    trail, client = setup
    response = await client.get("/api/admin/audit", headers={"x-test-who": who})
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert ("www-authenticate" in response.headers) == (status == 401)
    await trail.flush()
    denied = await trail.query(QueryFilters(event_type="auth_failed"))
    assert len(denied) == 1 and denied[0].body["reason"] == code
    assert denied[0].body["client_ip"].startswith("192.0.2.5")


async def test_bad_token_and_bad_parameters(setup: tuple[AuditTrail, httpx.AsyncClient]) -> None:
    _, client = setup
    response = await client.get("/api/admin/audit", headers={"x-test-who": "bad-token"})
    assert response.status_code == 401 and response.json()["error"]["code"] == "TOKEN_EXPIRED"
    for params in (
        {"limit": "0"},
        {"limit": "abc"},
        {"since": "yesterday"},
        {"since": "0001-01-01T00:00:00+01:00"},  # before the first instant UTC can hold
        {"until": "9999-12-31T23:59:59-01:00"},
        {"event_type": "nope"},
        {"ip": "1.2.3.4", "user_id": "x"},
        {"cursor": "-1"},
        {"cursor": str(2**63)},
        {"offset": str(2**64)},
    ):  # SQLite integers are 64-bit
        response = await client.get("/api/admin/audit", params=params, headers={"x-test-who": "admin"})
        assert response.status_code == 400, params
        assert response.json()["error"]["code"] == "INVALID_REQUEST"


async def test_tampering_shows_in_chain_status(setup: tuple[AuditTrail, httpx.AsyncClient]) -> None:
    import sqlite3

    trail, client = setup
    path = trail.store.path  # type: ignore[attr-defined]
    with sqlite3.connect(path) as conn:
        conn.execute("DELETE FROM audit_records WHERE id = 3")
    response = await client.get("/api/admin/audit", params={"verify": "1"}, headers={"x-test-who": "admin"})
    data = response.json()
    assert data["chain"]["ok"] is False and data["chain"]["first_bad_id"] == 4


def test_a_lone_surrogate_in_a_response_is_escaped_not_a_500() -> None:
    """A stored record may hold one (legal JSON); strict UTF-8 encoding of the answer would raise."""
    body = bytes(JSONResponse({"user_id": "a\ud800", "name": "zoë"}).body)
    assert body == '{"user_id":"a\\ud800","name":"zoë"}'.encode()
    assert json.loads(body) == {"user_id": "a\ud800", "name": "zoë"}
