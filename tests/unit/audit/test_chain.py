"""Tamper evidence: editing, deleting or reordering any single record is detected and named."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.audit.chain import Chain, verify
from bridge.audit.retention import purge
from bridge.audit.store import Link, QueryFilters, SQLiteStore, canonical_json, storable

KEY = b"c" * 32
N = 6


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "audit.sqlite3")
    bodies = [{"ts": f"2025-01-0{i}T00:00:00.000000Z", "event_type": "chat", "n": i} for i in range(1, N + 1)]
    s.append_batch(bodies[:2], Chain(KEY))
    s.append_batch(bodies[2:], Chain(KEY))
    yield s
    s.close()


def tamper(store: SQLiteStore, *statements: tuple[str, tuple[object, ...]]) -> None:
    with sqlite3.connect(store.path) as conn:
        for sql, args in statements:
            conn.execute(sql, args)


def row(store: SQLiteStore, record_id: int) -> tuple[str, str, str]:
    with sqlite3.connect(store.path) as conn:
        sql = "SELECT body, prev_hash, hash FROM audit_records WHERE id = ?"
        found = conn.execute(sql, (record_id,)).fetchone()
    return str(found[0]), str(found[1]), str(found[2])


def test_intact_chain_verifies(store: SQLiteStore) -> None:
    result = verify(store, KEY)
    assert (result.ok, result.checked, result.first_bad_id) == (True, N, None)


def test_wrong_key_fails(store: SQLiteStore) -> None:
    result = verify(store, b"x" * 32)
    assert not result.ok and result.first_bad_id == 1


@pytest.mark.parametrize("victim", range(1, N + 1))
def test_edit_is_named(store: SQLiteStore, victim: int) -> None:
    body = json.loads(row(store, victim)[0])
    body["n"] = 99
    tamper(store, ("UPDATE audit_records SET body = ? WHERE id = ?", (json.dumps(body), victim)))
    result = verify(store, KEY)
    assert (result.ok, result.first_bad_id) == (False, victim)
    assert "edited" in result.reason


@pytest.mark.parametrize("victim", range(1, N + 1))
def test_edited_hash_is_named(store: SQLiteStore, victim: int) -> None:
    tamper(store, ("UPDATE audit_records SET hash = ? WHERE id = ?", ("f" * 64, victim)))
    result = verify(store, KEY)
    assert (result.ok, result.first_bad_id) == (False, victim)


@pytest.mark.parametrize("victim", range(1, N + 1))
def test_delete_is_named(store: SQLiteStore, victim: int) -> None:
    tamper(store, ("DELETE FROM audit_records WHERE id = ?", (victim,)))
    result = verify(store, KEY)
    assert not result.ok
    # the record whose link broke: the one after the gap, or the deleted tail itself
    assert result.first_bad_id == (victim + 1 if victim < N else N)


@pytest.mark.parametrize("victim", range(1, N))
def test_reorder_is_named(store: SQLiteStore, victim: int) -> None:
    a, b = row(store, victim), row(store, victim + 1)
    update = "UPDATE audit_records SET body = ?, prev_hash = ?, hash = ? WHERE id = ?"
    tamper(store, (update, (*b, victim)), (update, (*a, victim + 1)))
    result = verify(store, KEY)
    assert (result.ok, result.first_bad_id) == (False, victim)


def test_deleted_head_row_is_detected(store: SQLiteStore) -> None:
    tamper(store, ("DELETE FROM audit_chain_head", ()))
    assert not verify(store, KEY).ok


def test_head_moved_back_after_tail_delete_is_detected(store: SQLiteStore) -> None:
    _, _, prev_hash = row(store, N - 1)
    tamper(
        store,
        ("DELETE FROM audit_records WHERE id = ?", (N,)),
        ("UPDATE audit_chain_head SET last_id = ?, last_hash = ?", (N - 1, prev_hash)),
    )
    result = verify(store, KEY)
    assert not result.ok and "MAC" in result.reason


def purge_before(store: SQLiteStore, cutoff: str) -> int:
    """Retention as the trail and the CLI run it: verify, then cut the verified old prefix."""
    return purge(store, KEY, [], cutoff, lambda: "2025-02-01T00:00:00.000000Z")


def test_purge_writes_a_checkpoint_and_verify_stays_green(store: SQLiteStore) -> None:
    assert purge_before(store, "2025-01-04T00:00:00.000000Z") == 3
    assert store.count() == N - 3 + 1
    assert verify(store, KEY).ok
    # a second purge removing everything, including the first checkpoint, still verifies
    assert purge_before(store, "2030-01-01T00:00:00.000000Z") == N - 3 + 1
    result = verify(store, KEY)
    assert result.ok and result.checked == 1
    # the next purge removes the previous checkpoint itself
    assert purge_before(store, "2030-01-01T00:00:00.000000Z") == 1
    assert verify(store, KEY).ok


def test_purge_is_a_prefix_even_when_clock_went_backwards(tmp_path: Path) -> None:
    s = SQLiteStore(tmp_path / "a.sqlite3")
    stamps = ["2025-01-01", "2025-03-01", "2025-01-02", "2025-03-02"]  # id 3 is "older" than id 2
    s.append_batch([{"ts": f"{t}T00:00:00.000000Z", "event_type": "chat"} for t in stamps], Chain(KEY))
    assert purge_before(s, "2025-02-01T00:00:00.000000Z") == 1
    assert verify(s, KEY).ok
    s.close()


def test_deleting_records_after_a_purge_is_still_detected(store: SQLiteStore) -> None:
    purge_before(store, "2025-01-04T00:00:00.000000Z")
    tamper(store, ("DELETE FROM audit_records WHERE id = 4", ()))
    result = verify(store, KEY)
    assert (result.ok, result.first_bad_id) == (False, 5)
    assert "checkpoint" in result.reason


# -- strings SQLite cannot give back ---------------------------------------------------------------

UNSTORABLE = {"a\ud800": "a\\ud800", "\udfff\ud800": "\\udfff\\ud800", "alice\x00x": "alice\\u0000x"}


def test_storable_escapes_surrogates_and_nul_in_every_string() -> None:
    body = {"user_id": "a\ud800", "filters": {"k\x00": ["\udfff", 3, None]}, "ok": "zoë 用户", "n": 1.5}
    assert storable(body) == {
        "user_id": "a\\ud800",
        "filters": {"k\\u0000": ["\\udfff", 3, None]},
        "ok": "zoë 用户",
        "n": 1.5,
    }


@pytest.mark.parametrize(("sent", "stored"), UNSTORABLE.items())
def test_every_string_is_stored_so_sql_reads_it_back(store: SQLiteStore, sent: str, stored: str) -> None:
    body = {"ts": "2025-01-09T00:00:00.000000Z", "event_type": "chat", "user_id": sent, "filters": {"user_id": sent}}
    store.append_batch([body], Chain(KEY))
    with sqlite3.connect(store.path) as conn:  # a plain reader: strict UTF-8, no help from the store
        assert conn.execute("SELECT user_id FROM audit_records WHERE id = ?", (N + 1,)).fetchone() == (stored,)
    (rec,) = store.query(QueryFilters(user_id=stored), 10)
    assert rec.body["user_id"] == rec.body["filters"]["user_id"] == stored
    assert verify(store, KEY).ok


def seal_unescaped(store: SQLiteStore, body: dict[str, object]) -> int:
    """Append ``body`` sealed as it is, bypassing ``storable``: a genuine record from a store
    written without it. Returns its id."""
    chain = Chain(KEY)
    with sqlite3.connect(store.path) as conn:
        last_id, last_hash = conn.execute("SELECT last_id, last_hash FROM audit_chain_head").fetchone()
        new = Link(last_id + 1, chain.seal(last_hash, last_id + 1, body))
        conn.execute(
            "INSERT INTO audit_records (id, body, prev_hash, hash) VALUES (?, ?, ?, ?)",
            (new.id, canonical_json(body), last_hash, new.hash),
        )
        conn.execute(
            "UPDATE audit_chain_head SET last_id = ?, last_hash = ?, mac = ?", (new.id, new.hash, chain.seal_head(new))
        )
    return new.id


@pytest.mark.parametrize("user_id", UNSTORABLE)
def test_genuine_record_with_an_unstorable_user_id_still_verifies_and_reads(store: SQLiteStore, user_id: str) -> None:
    """Such a record is not tampering: verify must pass it (or retention would refuse to purge forever)."""
    record_id = seal_unescaped(store, {"ts": "2025-01-09T00:00:00.000000Z", "event_type": "chat", "user_id": user_id})
    store.append_batch([{"ts": "2025-01-10T00:00:00.000000Z", "event_type": "chat"}], Chain(KEY))
    result = verify(store, KEY)
    assert (result.ok, result.checked) == (True, N + 2), result
    assert [r.id for r in store.query(QueryFilters(), 100)][:2] == [record_id + 1, record_id]
    assert store.query(QueryFilters(), 100)[1].body["user_id"] == user_id


def test_undecodable_rows_are_named_and_every_record_is_read(store: SQLiteStore) -> None:
    """Edits of the file that leave text SQLite hands back as non-UTF-8: verify names the first and
    still reads all N records; queries return every row."""
    tamper(
        store,
        ("UPDATE audit_records SET body = replace(body, '\"chat\"', '\"chat\\ud800\"') WHERE id = 3", ()),
        (
            "UPDATE audit_records SET body = CAST(? AS TEXT) WHERE id = 5",
            (row(store, 5)[0].encode().replace(b'"chat"', b'"chat\xff"'),),
        ),
    )
    with sqlite3.connect(store.path) as conn, pytest.raises(sqlite3.OperationalError, match="decode"):
        conn.execute("SELECT event_type FROM audit_records").fetchall()
    result = verify(store, KEY)
    assert (result.ok, result.checked, result.first_bad_id) == (False, N, 3), result
    assert "hash mismatch" in result.reason
    assert [r.id for r in store.query(QueryFilters(), 100)] == list(range(N, 0, -1))
    tamper(store, ("UPDATE audit_records SET body = replace(body, '\\ud800', '') WHERE id = 3", ()))
    result = verify(store, KEY)
    assert (result.ok, result.first_bad_id) == (False, 5) and "canonical" in result.reason, result
