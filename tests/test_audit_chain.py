"""Tamper evidence: editing, deleting or reordering any single record is detected and named."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.audit.chain import Chain, verify
from bridge.audit.retention import purge
from bridge.audit.store import SQLiteStore

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
