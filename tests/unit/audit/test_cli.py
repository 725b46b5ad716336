"""audit verify|purge|export|backup as the operator runs them."""

from __future__ import annotations

import argparse
import io
import json
import sqlite3
import stat
from pathlib import Path

import pytest

from bridge.audit.cli import add_audit_commands, run_backup, run_export, run_purge, run_verify
from bridge.audit.events import EventFactory
from bridge.audit.keys import key_path
from bridge.audit.trail import AuditTrail
from bridge.config import Settings
from bridge.types import Identity

USER = Identity(client_ip="198.51.100.4", user_id="u1")


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def filled(tmp_path: Path, n: int = 5) -> Settings:
    settings = Settings(audit_db=str(tmp_path / "audit.sqlite3"))
    trail = AuditTrail.from_settings(settings)
    await trail.start()
    events: EventFactory = trail.events
    for i in range(n):
        trail.record(events.stream("stream_started", USER, f"r{i}", None, "q"))
    await trail.aclose()
    return settings


async def test_verify_ok_then_broken_names_the_record(tmp_path: Path) -> None:
    settings = await filled(tmp_path)
    out = io.StringIO()
    assert run_verify(settings, out) == 0 and "OK: 5 records" in out.getvalue()
    with sqlite3.connect(settings.audit_db) as conn:
        conn.execute("UPDATE audit_records SET body = replace(body, 'r2', 'r9') WHERE id = 3")
    out = io.StringIO()
    assert run_verify(settings, out) == 1
    assert "BROKEN" in out.getvalue() and "at record 3" in out.getvalue()


async def test_missing_store_or_key_exits_2_without_creating_either(tmp_path: Path) -> None:
    missing = Settings(audit_db=str(tmp_path / "none.sqlite3"))
    assert run_verify(missing, io.StringIO()) == 2
    assert listing(tmp_path) == []
    settings = await filled(tmp_path)
    key_path(settings.audit_db).unlink()
    assert run_verify(settings, io.StringIO()) == 2
    assert "audit.sqlite3.key" not in listing(tmp_path)


async def test_purge_and_export(tmp_path: Path) -> None:
    settings = await filled(tmp_path)
    out = io.StringIO()
    assert run_purge(settings, 0, out) == 0 and "purged 5" in out.getvalue()
    assert run_verify(settings, io.StringIO()) == 0
    lines = io.StringIO()
    assert run_export(settings, lines) == 0
    rows = [json.loads(line) for line in lines.getvalue().splitlines()]
    assert [r["event_type"] for r in rows] == ["retention_checkpoint"]
    assert rows[0]["purged_count"] == 5 and len(rows[0]["hash"]) == 64


async def test_purge_older_than_beyond_the_calendar_keeps_everything_and_negative_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A cutoff before year 1 overflowed into a traceback; a negative one lies in the future and
    would purge every record, even those written while the purge runs."""
    settings = await filled(tmp_path)
    out = io.StringIO()
    assert run_purge(settings, 10**9, out) == 0
    assert out.getvalue() == "purged 0 audit records older than 0001-01-01T00:00:00.000000Z\n"
    parser = argparse.ArgumentParser()
    add_audit_commands(parser.add_subparsers(dest="command"), lambda args: settings)
    for days in ("-1", "soon"):
        with pytest.raises(SystemExit) as exited:
            parser.parse_args(["audit", "purge", "--older-than-days", days])
        assert exited.value.code == 2
        assert f"expected a whole number of days >= 0, got {days!r}" in capsys.readouterr().err
    assert run_verify(settings, io.StringIO()) == 0


async def test_backup_copies_key_and_refuses_to_overwrite(tmp_path: Path) -> None:
    settings = await filled(tmp_path)
    dest = tmp_path / "backups" / "copy.sqlite3"
    out = io.StringIO()
    assert run_backup(settings, str(dest), out) == 0 and "OK: 5 records" in out.getvalue()
    assert mode(key_path(dest)) == mode(dest) == 0o600
    assert run_verify(Settings(audit_db=str(dest)), io.StringIO()) == 0
    assert run_backup(settings, str(dest), io.StringIO()) == 2


async def test_argparse_wiring(tmp_path: Path) -> None:
    settings = await filled(tmp_path)
    parser = argparse.ArgumentParser()
    add_audit_commands(parser.add_subparsers(dest="command"), lambda args: settings)
    args = parser.parse_args(["audit", "export", "-o", str(tmp_path / "out.jsonl")])
    assert args.func(args) == 0
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 5
    assert mode(tmp_path / "out.jsonl") == 0o600
    args = parser.parse_args(["audit", "verify"])
    assert args.func(args) == 0
