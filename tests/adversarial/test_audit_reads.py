"""Attacks that made the audit trail unreadable or misfiltered, replayed against a real bridge.

Each test is named after the attack, drives a real bridge process (tokens required, HS256) and
the real ``audit verify`` CLI, and fails on a build without its fix:

* a validly signed token whose ``sub`` is a lone surrogate (``"a\\ud800"``) was served; its audit
  record's indexed ``user_id`` was not UTF-8, after which every unfiltered admin read answered
  500 and ``audit verify`` reported a broken chain with 0 records read;
* a row made undecodable by editing the SQLite file did the same: the admin API and verify must
  name that record and read every other one;
* ``since``/``until`` outside what UTC can hold (``0001-01-01T00:00:00+01:00``) answered 500 and
  dropped the keep-alive connection; a ``since`` before year 1000 matched nothing, because such
  years were written without zero padding and compared wrong as text.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.adversarial.test_audit_store import assert_broken
from tests.adversarial.test_identity import SECRET, assert_error, bearer
from tests.conftest import BridgeFactory
from tests.support.audit import audit_cli as cli
from tests.support.processes import Bridge, Stub

CHAT_PATH = "/api/v2/bali-zero/chat"
AUDIT_PATH = "/api/admin/audit"
REQUIRED = {"AUTH_REQUIRED": "true", "JWT_SECRET": SECRET, "RATE_LIMIT": "100000/minute"}
ADMIN = bearer("root", "admin")

POISONED_SUBS = [
    "a\ud800",  # lone surrogate: legal JSON, not UTF-8
    "\udfff",
    "alice\x00x",  # NUL: SQLite's JSON functions end the string there ("alice")
    "a\nb",  # control characters forge log lines
    "\u202eevil",  # right-to-left override (format character)
    " alice",  # surrounding space: looks like another user
    "x" * 129,
]


async def chats(client: httpx.AsyncClient, headers: dict[str, str], n: int) -> None:
    for i in range(n):
        response = await client.post(CHAT_PATH, json={"query": f"question {i}"}, headers=headers)
        assert response.status_code == 200, response.text


async def read_audit(client: httpx.AsyncClient, **params: str) -> dict[str, Any]:
    response = await client.get(AUDIT_PATH, params=params, headers=ADMIN)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    return body


async def until_stored(client: httpx.AsyncClient, event_type: str, count: int) -> list[dict[str, Any]]:
    """The ``event_type`` records once ``count`` are visible (the writer stores them asynchronously)."""
    for _ in range(400):
        page = await read_audit(client, event_type=event_type)
        if page["count"] >= count:
            records: list[dict[str, Any]] = page["records"]
            return records
        await asyncio.sleep(0.025)
    raise AssertionError(f"fewer than {count} {event_type} records were stored")


def stored_count(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT count(*) FROM audit_records").fetchone()[0])


def assert_no_traceback(bridge: Bridge) -> None:
    bridge.stop()  # SIGTERM: the audit writer drains, so the store is complete when this returns
    assert bridge.proc.returncode == 0, bridge.output()
    assert not any("Traceback" in line for line in bridge.stderr_lines), bridge.output()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "audit.sqlite3"


@pytest.fixture
def bridge(echo_stub: Stub, bridge_factory: BridgeFactory, db: Path) -> Bridge:
    return bridge_factory(echo_stub, AUDIT_DB=str(db), **REQUIRED)


# -- item 1: identities that poison the store -----------------------------------------------------


async def test_token_sub_with_lone_surrogate_is_refused_and_the_trail_stays_readable(bridge: Bridge, db: Path) -> None:
    async with httpx.AsyncClient(base_url=bridge.url, timeout=30) as client:
        for sub in POISONED_SUBS:
            response = await client.post(CHAT_PATH, json={"query": "hello"}, headers=bearer(sub))
            assert_error(response, 401, "INVALID_TOKEN")
            assert "subject" in response.json()["error"]["message"], sub
        await chats(client, bearer("zoë@example.com"), 1)  # strict, not ASCII-only
        await until_stored(client, "chat", 1)
        everything = await read_audit(client, verify="1")
        assert everything["chain"]["ok"] is True, everything["chain"]
        assert "zoë@example.com" in {r["user_id"] for r in everything["records"]}
    assert_no_traceback(bridge)
    result = await asyncio.to_thread(cli, db, "verify")
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert f"audit chain OK: {stored_count(db)} records verified" in result.stdout


async def test_undecodable_rows_written_into_the_store_are_named_by_record_number(bridge: Bridge, db: Path) -> None:
    """The store as an attacker with the file leaves it: a lone surrogate escape in one record's
    ``user_id`` (the indexed column becomes bytes that are not UTF-8) and raw non-UTF-8 bytes in
    another's body. Reads go on; verify names the first of them; nothing answers 500."""
    async with httpx.AsyncClient(base_url=bridge.url, timeout=30) as client:
        await chats(client, bearer("mallory"), 4)
        stored = await until_stored(client, "chat", 4)
        first, second = sorted(r["id"] for r in stored)[1:3]
        with sqlite3.connect(db) as conn:
            conn.execute(
                'UPDATE audit_records SET body = replace(body, \'"user_id":"mallory"\', '
                '\'"user_id":"mallory\\ud800"\') WHERE id = ?',
                (first,),
            )
            (body,) = conn.execute("SELECT body FROM audit_records WHERE id = ?", (second,)).fetchone()
            hostile = body.encode().replace(b'"mallory"', b'"mallory\xff"')
            conn.execute("UPDATE audit_records SET body = CAST(? AS TEXT) WHERE id = ?", (hostile, second))
        # the attack took: SQLite hands back text that is not UTF-8
        with sqlite3.connect(db) as conn, pytest.raises(sqlite3.OperationalError, match="decode"):
            conn.execute("SELECT user_id FROM audit_records").fetchall()

        everything = await read_audit(client, verify="1")
        ids = [r["id"] for r in everything["records"]]
        assert first in ids and second in ids
        chain = everything["chain"]
        assert (chain["ok"], chain["first_bad_id"]) == (False, first), chain
        assert chain["checked"] >= len(ids)
        mallory = await read_audit(client, user_id="mallory", event_type="chat")
        assert {r["id"] for r in mallory["records"]} == {r["id"] for r in stored} - {first, second}
    assert_no_traceback(bridge)
    total = stored_count(db)
    result = await asyncio.to_thread(cli, db, "verify")
    assert_broken(result, f"at record {first}:", f"({total} records read)")
    export = await asyncio.to_thread(cli, db, "export")
    assert export.returncode == 0 and "Traceback" not in export.stderr, export.stderr
    assert len(export.stdout.splitlines()) == total


# -- item 7: admin time filters -------------------------------------------------------------------


def local_port(response: httpx.Response) -> int:
    """The client-side port of the connection that carried ``response`` (same port: same connection)."""
    port: int = response.extensions["network_stream"].get_extra_info("client_addr")[1]
    return port


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("since", "0001-01-01T00:00:00+01:00"),  # an hour before the first UTC instant
        ("until", "9999-12-31T23:59:59-01:00"),  # an hour after the last
        ("since", "9999-12-31T23:59:59.999999-23:59"),
    ],
)
async def test_admin_time_filter_outside_utc_range_is_400_on_a_kept_connection(
    bridge: Bridge, name: str, value: str
) -> None:
    async with httpx.AsyncClient(base_url=bridge.url, timeout=30) as client:
        before = await client.get(AUDIT_PATH, headers=ADMIN)
        assert before.status_code == 200, before.text
        refused = await client.get(AUDIT_PATH, params={name: value}, headers=ADMIN)
        assert_error(refused, 400, "INVALID_REQUEST")
        assert name in refused.json()["error"]["message"] and "0001-01-01" in refused.json()["error"]["message"]
        after = await client.get(AUDIT_PATH, headers=ADMIN)
        assert after.status_code == 200, after.text
        assert local_port(before) == local_port(refused) == local_port(after)


async def test_admin_since_before_year_1000_matches_every_record(bridge: Bridge) -> None:
    async with httpx.AsyncClient(base_url=bridge.url, timeout=30) as client:
        await chats(client, bearer("carol"), 3)
        await until_stored(client, "chat", 3)
        for since in ("0999-01-01T00:00:00Z", "0001-01-01T00:00:00Z", "0099-12-31T23:00:00-00:59"):
            assert (await read_audit(client, event_type="chat", since=since))["count"] == 3, since
            assert (await read_audit(client, event_type="chat", until=since))["count"] == 0, since
        late = await read_audit(client, event_type="chat", until="9999-12-31T23:59:59.999999Z")
        assert late["count"] == 3
