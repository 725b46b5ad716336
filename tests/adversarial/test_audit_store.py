"""Attacks on the audit trail by someone who can write the database (and its directory) but has no key.

Issue #14 part 3. Each test is named after the tampering, drives the real CLI in a subprocess against
a real SQLite file (the last one also a real bridge process), and fails on a build without the fix:

* a duplicate key prepended to a body changed the indexed columns while ``verify`` still passed;
* backdating ``ts`` made ``audit purge`` delete minutes-old records and write a valid checkpoint;
* deleting every row (or dropping the tables) verified as "OK: 0 records";
* truncating the tail and putting back an old, validly MAC'd head row verified as OK;
* rolling the whole store back to an old copy verified as OK.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bridge.audit.anchor import head_path
from bridge.audit.trail import AuditTrail
from bridge.config import Settings
from bridge.types import Identity
from tests.conftest import StubFactory
from tests.support.audit import audit_cli as cli
from tests.support.processes import ROOT, Bridge, base_env

USER = Identity(client_ip="198.51.100.7", user_id="alice")
BACKDATED = "2001-01-01T00:00:00.000000Z"
CHAT_PATH = "/api/v2/bali-zero/chat"


async def write_records(db: Path, n: int, *, first: int = 0) -> None:
    """``n`` records through a real trail, which seals its final head beside the store on close."""
    trail = AuditTrail.from_settings(Settings(audit_db=str(db)))
    await trail.start()
    for i in range(first, first + n):
        assert trail.record(trail.events.stream("stream_started", USER, f"req-{i}", None, "q"))
    await trail.aclose()


def sql(db: Path, *statements: str) -> None:
    with sqlite3.connect(db) as conn:
        for statement in statements:
            conn.execute(statement)


def rows(db: Path, query: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(db) as conn:
        return list(conn.execute(query).fetchall())


def prepend(fields: str, where: str) -> str:
    """The UPDATE that prepends JSON members to a body: SQLite indexes the first duplicate, Python the last."""
    return f"UPDATE audit_records SET body = '{{' || '{fields},' || substr(body, 2) WHERE {where}"


def assert_broken(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "BROKEN" in result.stdout, result.stdout
    for needle in needles:
        assert needle in result.stdout, (needle, result.stdout)
    assert "Traceback" not in result.stderr, result.stderr


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "store" / "audit.sqlite3"


async def test_duplicate_key_prepend_is_detected(db: Path) -> None:
    await write_records(db, 5)
    assert cli(db, "verify").returncode == 0
    sql(db, prepend(f'"user_id":"someone-else","ts":"{BACKDATED}"', "id = 3"))
    # the attack works on what SQL sees: the record now files under another user and another day
    assert rows(db, "SELECT id, ts FROM audit_records WHERE user_id = 'someone-else'") == [(3, BACKDATED)]
    assert_broken(cli(db, "verify"), "at record 3", "canonical")


async def test_schema_swap_with_a_plain_ts_column_is_detected(db: Path) -> None:
    """The same lie without touching the body: the generated column replaced by a writable one."""
    await write_records(db, 5)
    sql(
        db,
        "ALTER TABLE audit_records RENAME TO old_records",
        "CREATE TABLE audit_records (id INTEGER PRIMARY KEY, body TEXT NOT NULL, prev_hash TEXT NOT NULL, "
        "hash TEXT NOT NULL, ts TEXT, event_type TEXT, user_id TEXT)",
        "INSERT INTO audit_records SELECT id, body, prev_hash, hash, ts, event_type, user_id FROM old_records",
        "DROP TABLE old_records",
        f"UPDATE audit_records SET ts = '{BACKDATED}' WHERE id = 2",
    )
    assert_broken(cli(db, "verify"), "at record 2", "column ts")


async def test_backdated_ts_does_not_purge_recent_records(db: Path) -> None:
    await write_records(db, 40)
    sql(db, prepend(f'"ts":"{BACKDATED}"', "id <= 30"))
    assert rows(db, f"SELECT count(*) FROM audit_records WHERE ts < '{BACKDATED[:4]}-12'") == [(30,)]
    result = cli(db, "purge")  # default retention: 90 days; every record is minutes old
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "REFUSING TO PURGE" in result.stdout and "record 1" in result.stdout, result.stdout
    assert rows(db, "SELECT count(*) FROM audit_records") == [(40,)]
    assert rows(db, "SELECT count(*) FROM audit_records WHERE event_type = 'retention_checkpoint'") == [(0,)]


async def test_backdated_ts_is_not_purged_by_the_running_trail(db: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The bridge's own retention (start-up and hourly) refuses too, loudly, deleting nothing."""
    await write_records(db, 10)
    sql(db, prepend(f'"ts":"{BACKDATED}"', "id <= 5"))
    trail = AuditTrail.from_settings(Settings(audit_db=str(db)))
    with caplog.at_level(logging.CRITICAL, logger="bridge.audit"):
        await trail.start()
        assert trail.background_purge is not None
        with pytest.raises(Exception, match="does not verify at record 1"):
            await asyncio.wrap_future(trail.background_purge)
        await trail.aclose()
    assert any("PURGE REFUSED" in r.getMessage() for r in caplog.records)
    assert rows(db, "SELECT count(*) FROM audit_records") == [(10,)]


@pytest.mark.parametrize("wipe", ["delete rows", "drop tables"])
async def test_wiped_store_fails_verify_against_sealed_head(db: Path, wipe: str) -> None:
    await write_records(db, 10)
    assert head_path(db).is_file()
    if wipe == "delete rows":
        sql(db, "DELETE FROM audit_records", "DELETE FROM audit_chain_head")
    else:
        sql(db, "DROP TABLE audit_records", "DROP TABLE audit_chain_head")
    assert_broken(cli(db, "verify"), "records 1..10 are missing", "the store is empty")


async def test_deleting_the_sealed_head_file_fails_verify(db: Path) -> None:
    await write_records(db, 3)
    sql(db, "DELETE FROM audit_records", "DELETE FROM audit_chain_head")
    head_path(db).unlink()
    assert_broken(cli(db, "verify"), "no sealed head")


async def test_edited_sealed_head_file_fails_verify(db: Path) -> None:
    await write_records(db, 3)
    sealed = json.loads(head_path(db).read_text())
    head_path(db).write_text(json.dumps({**sealed, "seq": 1}))  # "the store only ever held record 1"
    sql(db, "DELETE FROM audit_records WHERE id > 1")
    assert_broken(cli(db, "verify"), "not a valid signed head")


async def test_truncated_tail_names_missing_range(db: Path, tmp_path: Path) -> None:
    await write_records(db, 14)
    old_head = rows(db, "SELECT last_id, last_hash, mac FROM audit_chain_head")[0]  # saved by the attacker
    await write_records(db, 6, first=14)
    sql(
        db,
        "DELETE FROM audit_records WHERE id > 14",
        f"UPDATE audit_chain_head SET last_id = {old_head[0]}, last_hash = '{old_head[1]}', mac = '{old_head[2]}'",
    )
    assert_broken(cli(db, "verify"), "records 15..20 are missing", "ends at record 14")


async def test_rollback_to_old_head_is_detected(db: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Roll the store back to an old copy while the seal stays: the bridge keeps writing on top of it."""
    await write_records(db, 8)
    saved = tmp_path / "old.sqlite3"
    shutil.copyfile(db, saved)  # closed store: the WAL was checkpointed into the main file
    await write_records(db, 7, first=8)
    shutil.copyfile(saved, db)
    with caplog.at_level(logging.CRITICAL, logger="bridge.audit"):
        await write_records(db, 9, first=100)  # ids 9..17 reused, with other hashes
    assert any("TAMPERED" in r.getMessage() for r in caplog.records)  # the seal was kept as evidence
    assert_broken(cli(db, "verify"), "record 15 differs from the anchored head")


async def test_forged_head_line_in_log_is_rejected(db: Path, tmp_path: Path) -> None:
    await write_records(db, 3)
    log = tmp_path / "combined.log"
    forged = {"event": "audit_head", "seq": 1, "hash": "0" * 64, "head_ts": BACKDATED, "mac": "ab" * 32}
    log.write_text("not json\n" + "x" * 100_000 + "\n" + json.dumps(forged) + "\n")
    assert_broken(cli(db, "verify", "--heads-from", str(log)), "line 3")


async def test_sealed_head_replaced_by_a_fifo_does_not_hang(db: Path) -> None:
    """Opening a FIFO blocks until a writer appears: verify and the bridge's writer must not wait."""
    await write_records(db, 3)
    head_path(db).unlink()
    os.mkfifo(head_path(db))
    assert_broken(cli(db, "verify"), "not a regular file")  # cli() times out (fails) if it hangs
    trail = AuditTrail.from_settings(Settings(audit_db=str(db)))
    await trail.start()
    trail.record(trail.events.stream("stream_started", USER, "after", None, "q"))
    await asyncio.wait_for(trail.aclose(), 10)
    assert trail.anchor.refused is not None and "regular file" in trail.anchor.refused


async def test_heads_piped_from_the_log_store_are_read_once(db: Path, tmp_path: Path) -> None:
    """``--heads-from <(grep …)``: a pipe cannot be read twice, so one pass must check every head."""
    await write_records(db, 2)
    old_head = rows(db, "SELECT last_id, last_hash, mac FROM audit_chain_head")[0]
    await write_records(db, 1, first=2)
    head = json.loads(head_path(db).read_text())
    log = tmp_path / "shipped.log"
    log.write_text(json.dumps({"ts": "x", "level": "INFO", "message": "audit chain head", **head}) + "\n")
    script = f"{sys.executable} -m bridge audit verify --heads-from <(grep audit_head {log})"

    def verify_piped() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", script],
            env=base_env({"AUDIT_DB": str(db)}),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    result = await asyncio.to_thread(verify_piped)
    assert result.returncode == 0 and "1 signed heads" in result.stdout, (result.stdout, result.stderr)
    sql(
        db,
        "DELETE FROM audit_records WHERE id = 3",
        f"UPDATE audit_chain_head SET last_id = {old_head[0]}, last_hash = '{old_head[1]}', mac = '{old_head[2]}'",
    )
    head_path(db).unlink()  # only the piped log is left to tell
    assert_broken(await asyncio.to_thread(verify_piped), "records 3..3 are missing")


async def test_log_without_heads_does_not_vouch_for_the_store(db: Path, tmp_path: Path) -> None:
    await write_records(db, 3)
    log = tmp_path / "wrong.log"
    log.write_text('{"event":"stream_end"}\n')
    assert_broken(cli(db, "verify", "--heads-from", str(log)), "no audit_head lines")


# -- end to end: a real bridge anchors its heads in its log and the sealed file --------------------


def restore(saved: dict[Path, bytes], wal: Path) -> None:
    """Put the attacker's old copies back (the WAL of the newer store goes too)."""
    for path, content in saved.items():
        path.write_bytes(content)
    wal.unlink(missing_ok=True)


@pytest.fixture
def bridges() -> Iterator[list[Bridge]]:
    started: list[Bridge] = []
    yield started
    for bridge in started:
        bridge.stop()


async def run_bridge(stub_target: str, db: Path, log: Path, chats: int, started: list[Bridge]) -> None:
    """A bridge that serves ``chats`` requests (one audit record each) and is then stopped by SIGTERM."""
    env = {"AUDIT_DB": str(db), "RAG_TARGET": stub_target, "LOG_FILE": str(log), "LOG_LEVEL": "INFO"}
    bridge = Bridge(env)
    started.append(bridge)
    async with httpx.AsyncClient(base_url=bridge.url, timeout=30) as client:
        for i in range(chats):
            response = await client.post(CHAT_PATH, json={"query": f"question {i}"})
            assert response.status_code == 200, response.text
    bridge.signal(signal.SIGTERM)
    assert await asyncio.to_thread(bridge.wait, 30) == 0


async def test_whole_store_rollback_is_caught_by_heads_from_the_log(
    stub_factory: StubFactory, bridges: list[Bridge], db: Path, tmp_path: Path
) -> None:
    """The attacker rolls back the store *and* the sealed head file; the shipped log still knows."""
    stub = stub_factory("--mode", "echo")
    log = tmp_path / "logs" / "combined.log"
    await run_bridge(stub.target, db, log, 3, bridges)
    saved = {p: p.read_bytes() for p in (db, head_path(db))}  # the attacker's old copy, store and seal
    await run_bridge(stub.target, db, log, 4, bridges)
    heads = [json.loads(line) for line in log.read_text().splitlines() if '"audit_head"' in line]
    assert heads and heads[-1]["seq"] == 7 and heads[-1]["event"] == "audit_head", heads  # SIGTERM's head
    assert json.loads(head_path(db).read_text())["seq"] == 7
    await asyncio.to_thread(restore, saved, Path(f"{db}-wal"))
    assert cli(db, "verify").returncode == 0  # locally consistent: only the log can tell
    assert_broken(cli(db, "verify", "--heads-from", str(log)), "records 4..7 are missing", "ends at record 3")
