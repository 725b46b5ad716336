"""``bali-zero-bridge audit verify|purge|export|backup``: operator commands over the audit store.

They never create a key: a missing key file would otherwise be replaced by a fresh one and every
record would then "fail" verification (or, for purge, be chained onto under the wrong key).
Exit codes: 0 ok, 1 verification failed, 2 cannot open the store or key.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TextIO

from bridge.audit.chain import Chain, VerifyResult, verify
from bridge.audit.events import checkpoint_event, format_ts, utc_now
from bridge.audit.keys import AuditKeys, key_path, load_keys
from bridge.audit.store import Link, SQLiteStore
from bridge.config import ConfigError, Settings

SettingsFactory = Callable[[argparse.Namespace], Settings]


def run_verify(settings: Settings, out: TextIO = sys.stdout) -> int:
    opened = _open(settings, out)
    if opened is None:
        return 2
    store, keys = opened
    try:
        return _report(verify(store, keys.chain_key), settings.audit_db, out)
    finally:
        store.close()


def run_purge(settings: Settings, older_than_days: int | None = None, out: TextIO = sys.stdout) -> int:
    opened = _open(settings, out)
    if opened is None:
        return 2
    store, keys = opened
    days = settings.audit_retention_days if older_than_days is None else older_than_days
    cutoff = format_ts(utc_now() - timedelta(days=days))

    def checkpoint(count: int, last: Link) -> dict[str, Any]:
        return dict(checkpoint_event(format_ts(utc_now()), count, last.id, last.hash, cutoff).body)

    try:
        count = store.purge_before(cutoff, Chain(keys.chain_key), checkpoint)
    finally:
        store.close()
    print(f"purged {count} audit records older than {cutoff}", file=out)
    return 0


def run_export(settings: Settings, out: TextIO, err: TextIO = sys.stderr) -> int:
    """Every record as one JSON line, with ``prev_hash`` and ``hash`` so the export can be checked."""
    opened = _open(settings, err)
    if opened is None:
        return 2
    store, _ = opened
    try:
        with store.snapshot() as snap:
            for rec in snap.records:
                out.write(json.dumps({**rec.row(), "prev_hash": rec.prev_hash, "hash": rec.hash},
                                     separators=(",", ":")) + "\n")
    finally:
        store.close()
    return 0


def run_backup(settings: Settings, path: str, out: TextIO = sys.stdout) -> int:
    """Copy the store with SQLite's online backup, copy a generated key beside it, verify the copy."""
    opened = _open(settings, out)
    if opened is None:
        return 2
    store, keys = opened
    try:
        if Path(path).exists():
            print(f"refusing to overwrite {path}", file=out)
            return 2
        store.backup(path)
    finally:
        store.close()
    if not settings.audit_hash_key:  # without its key a backup cannot be verified
        shutil.copyfile(key_path(settings.audit_db), key_path(path))
        os.chmod(key_path(path), 0o600)
    copy = SQLiteStore(path)
    try:
        return _report(verify(copy, keys.chain_key), path, out)
    finally:
        copy.close()


def add_audit_commands(subparsers: Any, settings_factory: SettingsFactory) -> None:
    """Add ``audit verify|purge|export|backup``; each parser gets ``func(args) -> exit code``."""
    audit = subparsers.add_parser("audit", help="verify, purge, export or back up the audit trail")
    commands = audit.add_subparsers(dest="audit_command", required=True)
    commands.add_parser("verify", help="check the tamper-evident chain").set_defaults(
        func=lambda a: run_verify(settings_factory(a)))
    purge = commands.add_parser("purge", help="delete records older than the retention")
    purge.add_argument("--older-than-days", type=int, default=None)
    purge.set_defaults(func=lambda a: run_purge(settings_factory(a), a.older_than_days))
    export = commands.add_parser("export", help="write every record as JSON lines")
    export.add_argument("--output", "-o", default="-", help="file (default: stdout)")
    export.set_defaults(func=lambda a: _export_to(settings_factory(a), a.output))
    backup = commands.add_parser("backup", help="online copy of the store, verified")
    backup.add_argument("path")
    backup.set_defaults(func=lambda a: run_backup(settings_factory(a), a.path))


EXIT_BROKEN_PIPE = 128 + 13
"""What a reader closing the pipe early (``export | head -1``) exits with: 128 + SIGPIPE, as ``yes`` does."""


def _export_to(settings: Settings, output: str) -> int:
    if output == "-":
        try:
            code = run_export(settings, sys.stdout)
            sys.stdout.flush()
        except BrokenPipeError:
            # The reader has what it wanted. No traceback; and point stdout at /dev/null so the
            # interpreter's own flush at exit does not fail (and print) on the same closed pipe.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            return EXIT_BROKEN_PIPE
        return code
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # the export holds PII
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        return run_export(settings, f)


def _open(settings: Settings, out: TextIO) -> tuple[SQLiteStore, AuditKeys] | None:
    if not Path(settings.audit_db).is_file():
        print(f"no audit store at {settings.audit_db}", file=out)
        return None
    try:
        keys = load_keys(settings.audit_db, settings.audit_hash_key, create=False)
    except (ConfigError, OSError) as exc:
        print(f"cannot load the audit key: {exc}", file=out)
        return None
    return SQLiteStore(settings.audit_db), keys


def _report(result: VerifyResult, where: str, out: TextIO) -> int:
    if result.ok:
        print(f"audit chain OK: {result.checked} records verified in {where}", file=out)
        return 0
    print(f"audit chain BROKEN in {where} at record {result.first_bad_id}: {result.reason} "
          f"({result.checked} records read)", file=out)
    return 1
