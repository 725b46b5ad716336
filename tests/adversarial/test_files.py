"""Attacks through the files the bridge trusts, by a user who can plant files or symlinks near them.

Each test is named after the attack and drives the real bridge starting up (``python -m bridge``)
or the real ``bali-zero-bridge audit`` CLI in a subprocess, against real files: a key file owned
by another user (who then knows the key behind query hashes, pseudonyms and chain MACs), a key
file symlinked to a setuid binary (chmod-ed through the link, then a traceback on its bytes), a
non-ASCII key, a dangling AUDIT_DB symlink (the store created wherever it points), a symlink at
SQLite's -wal, a store directory anyone can write, and a symlinked or foreign LOG_FILE. A refusal
is one line naming the path and exit 2, with nothing written where the link points.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from bridge.audit.keys import key_path, load_keys
from bridge.audit.store import SQLiteStore
from tests.support.audit import audit_cli
from tests.support.processes import ROOT, base_env

NOBODY = 65534
"""Another user: the owner of the planted files (the tests run as root in CI to chown them)."""
VICTIM_TEXT = "a file the attacker wants overwritten or read\n"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


@dataclass(frozen=True)
class Outcome:
    code: int
    out: str
    err: str
    listening: bool


def start_bridge(env: dict[str, str]) -> Outcome:
    """Start a real bridge that should refuse to start; one that starts anyway is stopped at once.

    Its first stdout line is the "listening" announcement, so waiting for that line (or for the
    end of its stdout, when it exits) needs no timeout guess.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge", "--port", "0"],
        env=base_env(env),
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    if "listening" in first:
        proc.kill()
    out, err = proc.communicate(timeout=60)
    return Outcome(proc.returncode, first + out, err, "listening" in first)


def run_audit(db: Path, *args: str) -> Outcome:
    result = audit_cli(db, *args)
    return Outcome(result.returncode, result.stdout, result.stderr, False)


def assert_refused_start(outcome: Outcome, *needles: str) -> None:
    """Exit 2, exactly one stderr line holding every needle, no traceback, never served."""
    assert not outcome.listening, ("the bridge started", outcome)
    lines = outcome.err.strip().splitlines()
    assert outcome.code == 2, outcome
    assert len(lines) == 1, outcome.err
    assert "Traceback" not in outcome.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def assert_refused_cli(outcome: Outcome, *needles: str) -> None:
    """``audit`` commands report on stdout: exit 2, one line holding every needle, nothing on stderr."""
    lines = outcome.out.strip().splitlines()
    assert outcome.code == 2, outcome
    assert len(lines) == 1 and "Traceback" not in outcome.err and not outcome.err.strip(), outcome
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """An existing (empty) store with its generated key, as a bridge leaves them."""
    path = tmp_path / "store" / "audit.sqlite3"
    SQLiteStore(path).close()
    load_keys(path)
    return path


def victim(tmp_path: Path, name: str = "victim.txt") -> Path:
    target = tmp_path / "elsewhere" / name
    target.parent.mkdir(exist_ok=True)
    target.write_text(VICTIM_TEXT)
    return target


@needs_root
def test_key_file_owned_by_another_user_is_refused(db: Path) -> None:
    """That user wrote or can read the key: they would know every query hash, pseudonym and MAC."""
    key = key_path(db)
    os.chown(key, NOBODY, NOBODY)
    assert_refused_start(start_bridge({"AUDIT_DB": str(db)}), str(key), f"uid {NOBODY}")
    assert_refused_cli(run_audit(db, "verify"), str(key), f"uid {NOBODY}")


def test_key_file_symlink_to_setuid_binary_is_refused_and_the_binary_keeps_its_mode(db: Path, tmp_path: Path) -> None:
    """The key file chmod-ed through a symlink turned a setuid binary 4755 into 600 (as root)."""
    binary = tmp_path / "elsewhere" / "setuid-tool"
    binary.parent.mkdir()
    shutil.copyfile(sys.executable, binary)
    binary.chmod(0o4755)
    key = key_path(db)
    key.unlink()
    key.symlink_to(binary)
    assert_refused_start(start_bridge({"AUDIT_DB": str(db)}), str(key), "symbolic link")
    assert_refused_cli(run_audit(db, "verify"), str(key), "symbolic link")
    assert stat.S_IMODE(binary.stat().st_mode) == 0o4755


@pytest.mark.parametrize("content", ["clé-secrète-de-l'opérateur-assez-longue\n".encode(), b"\xff\xfe\x00\x7fELF"])
def test_non_ascii_key_file_is_one_line_not_a_traceback(db: Path, content: bytes) -> None:
    key_path(db).write_bytes(content)
    assert_refused_start(start_bridge({"AUDIT_DB": str(db)}), str(key_path(db)), "not ASCII")
    assert_refused_cli(run_audit(db, "verify"), str(key_path(db)), "not ASCII")


def test_group_writable_key_file_is_refused_not_adopted(db: Path) -> None:
    """Someone in the group could have written the key; tightening the mode would adopt their key."""
    key_path(db).chmod(0o660)
    assert_refused_start(start_bridge({"AUDIT_DB": str(db)}), str(key_path(db)), "writable by group or others")
    assert stat.S_IMODE(key_path(db).stat().st_mode) == 0o660  # left for the operator to inspect


def test_dangling_audit_db_symlink_creates_nothing_where_it_points(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    target = tmp_path / "elsewhere" / "planted.sqlite3"
    target.parent.mkdir()
    db = store_dir / "audit.sqlite3"
    db.symlink_to(target)
    assert_refused_start(start_bridge({"AUDIT_DB": str(db)}), str(db), "symbolic link")
    assert list(target.parent.iterdir()) == []
    assert sorted(p.name for p in store_dir.iterdir()) == ["audit.sqlite3"]  # not even a generated key
    assert_refused_cli(run_audit(db, "verify"), str(db), "symbolic link")


def test_wal_symlink_beside_the_store_is_refused_before_sqlite_opens_it(db: Path, tmp_path: Path) -> None:
    """SQLite opens ``<db>-wal`` by name; the bridge refuses a symlink there itself, naming it."""
    target = victim(tmp_path)
    wal = Path(f"{db}-wal")
    wal.symlink_to(target)
    assert_refused_start(start_bridge({"AUDIT_DB": str(db)}), str(wal), "symbolic link")
    assert_refused_cli(run_audit(db, "verify"), str(wal), "symbolic link")
    assert target.read_text() == VICTIM_TEXT


def test_world_writable_store_directory_without_sticky_bit_is_refused(db: Path) -> None:
    """Anyone could swap the store, key or WAL for their own, or plant symlinks at their names."""
    db.parent.chmod(0o777)
    assert_refused_start(start_bridge({"AUDIT_DB": str(db)}), str(db.parent), "writable by group or others")
    assert_refused_cli(run_audit(db, "verify"), str(db.parent), "writable by group or others")


def test_world_writable_directory_above_the_store_is_refused(tmp_path: Path) -> None:
    """Without the sticky bit, anyone can rename the store's directory and put their own in its place."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    db = shared / "store" / "audit.sqlite3"
    assert_refused_start(start_bridge({"AUDIT_DB": str(db)}), str(shared), "without the sticky bit")
    assert not (shared / "store").exists()


@pytest.mark.parametrize("variable", ["LOG_FILE", "ERROR_LOG_FILE"])
def test_log_file_symlink_is_refused_and_its_target_untouched(tmp_path: Path, variable: str) -> None:
    """Through a symlink at a log path the bridge would append its log lines to the file it names."""
    target = victim(tmp_path)
    log = tmp_path / "logs" / "bridge.log"
    log.parent.mkdir()
    log.symlink_to(target)
    env = {"AUDIT_DB": str(tmp_path / "store" / "audit.sqlite3"), variable: str(log)}
    assert_refused_start(start_bridge(env), str(log), "symbolic link")
    assert target.read_text() == VICTIM_TEXT


@needs_root
def test_log_file_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    """Their file, where they read every line; or a hard link they made to a file of ours."""
    log = tmp_path / "logs" / "combined.log"
    log.parent.mkdir()
    log.write_text("")
    os.chown(log, NOBODY, NOBODY)
    env = {"AUDIT_DB": str(tmp_path / "store" / "audit.sqlite3"), "LOG_FILE": str(log)}
    assert_refused_start(start_bridge(env), str(log), f"uid {NOBODY}")
    assert log.read_text() == ""


def test_export_output_symlink_is_not_followed(db: Path, tmp_path: Path) -> None:
    """``audit export -o`` through a planted symlink would overwrite its target with personal data."""
    target = victim(tmp_path)
    output = tmp_path / "export.jsonl"
    output.symlink_to(target)
    outcome = run_audit(db, "export", "-o", str(output))
    assert outcome.code == 2 and str(output) in outcome.err and "symbolic link" in outcome.err, outcome
    assert "Traceback" not in outcome.err
    assert target.read_text() == VICTIM_TEXT


def test_backup_key_copy_does_not_follow_a_planted_symlink(db: Path, tmp_path: Path) -> None:
    """``audit backup`` copied the audit key through a symlink at ``<backup>.key`` into its target."""
    target = victim(tmp_path)
    backup = tmp_path / "backups" / "audit.sqlite3"
    backup.parent.mkdir()
    key_path(backup).symlink_to(target)
    outcome = run_audit(db, "backup", str(backup))
    assert outcome.code == 2 and str(key_path(backup)) in outcome.out, outcome
    assert target.read_text() == VICTIM_TEXT
    assert not backup.exists()


def test_malformed_jwt_public_key_file_is_one_line_not_a_traceback(db: Path, tmp_path: Path) -> None:
    """A ConfigError raised while the bridge builds its state is reported like a bad variable."""
    pem = tmp_path / "jwt.pem"
    pem.write_bytes(b"-----BEGIN PUBLIC KEY-----\n\xff\xfe\n")
    env = {"AUDIT_DB": str(db), "JWT_PUBLIC_KEY_FILE": str(pem)}
    assert_refused_start(start_bridge(env), "JWT_PUBLIC_KEY_FILE", str(pem))
