"""``bali-zero-bridge audit verify|purge|export|backup``: operator commands over the audit store.

They never create a key: a missing key file would otherwise be replaced by a fresh one and every
record would then "fail" verification (or, for purge, be chained onto under the wrong key).
``verify`` also checks the signed head sealed in ``<AUDIT_DB>.head`` (and, with ``--heads-from``,
every ``audit_head`` line of a log file): an emptied or truncated store fails, naming the missing
records. ``purge`` verifies first and refuses (exit 1) when that fails.
The store, key and head are opened by the bridge's own rules (bridge/safefiles.py): one owned by
another user, a symlink, or a directory others can write is refused, one line naming the path.
Exit codes: 0 ok, 1 verification failed, 2 cannot open the store or key (or refused them).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sqlite3
import sys
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from bridge.audit.anchor import AnchoredHead, HeadSigner, SealedHeadFile, head_path, heads_from_log
from bridge.audit.chain import VerifyResult, verify
from bridge.audit.events import format_ts, retention_cutoff, utc_now
from bridge.audit.keys import AuditKeys, key_path, load_keys, load_master_key, write_key_file
from bridge.audit.retention import purge, sealed_heads
from bridge.audit.store import SQLiteStore
from bridge.config import Settings
from bridge.errors import AuditChainBroken, ConfigError
from bridge.safefiles import open_output

SettingsFactory = Callable[[argparse.Namespace], Settings]


MAX_BAD_LOG_LINES = 20
"""At most this many bad ``audit_head`` log lines are listed (the count is always given)."""


def run_verify(settings: Settings, out: TextIO = sys.stdout, heads_from: str | None = None) -> int:
    """Verify the chain, the sealed head and (``heads_from``) every head logged in a file."""
    opened = _open(settings, out)
    if opened is None:
        return 2
    store, keys = opened
    signer = HeadSigner(keys.head_key)
    try:
        sealed = SealedHeadFile(head_path(settings.audit_db), signer)
        try:
            heads = sealed_heads(sealed)
        except AuditChainBroken as exc:
            return _report(VerifyResult(False, 0, None, exc.reason), settings.audit_db, out)
        if not heads and heads_from is None:
            reason = (
                f"no sealed head at {sealed.path}, so an emptied or truncated store cannot be told from "
                "an intact one (the bridge writes it at start, periodically and at shutdown); "
                "check against logged heads with --heads-from LOGFILE"
            )
            return _report(VerifyResult(False, 0, None, reason), settings.audit_db, out)
        if heads_from is None:
            return _report(verify(store, keys.chain_key, heads), settings.audit_db, out)
        logged = LoggedHeads(heads_from, signer)
        try:
            result = verify(store, keys.chain_key, itertools.chain(heads, logged))
        except OSError as exc:
            print(f"cannot read {heads_from}: {exc}", file=out)
            return 1
        if result.ok and logged.problem() is not None:
            print(f"audit heads BROKEN in {heads_from}: {logged.problem()}", file=out)
            return 1
        if result.ok:
            print(f"{logged.valid} signed heads from {heads_from} are held by the store", file=out)
        return _report(result, settings.audit_db, out)
    finally:
        store.close()


class LoggedHeads:
    """The signed heads of a log file, streamed once into verify; forged lines are remembered.

    One pass, no list: a log store export can hold millions of heads, and ``--heads-from`` may be
    a pipe (``<(grep audit_head combined.log)``) that cannot be read twice.
    """

    def __init__(self, path: str, signer: HeadSigner) -> None:
        self._path = path
        self._signer = signer
        self.valid = 0
        self.bad: list[int] = []

    def __iter__(self) -> Iterator[AnchoredHead]:
        for line in heads_from_log(self._path, self._signer):
            if line.head is None:
                if len(self.bad) <= MAX_BAD_LOG_LINES:
                    self.bad.append(line.number)
                continue
            self.valid += 1
            yield line.head

    def problem(self) -> str | None:
        """Why the log does not vouch for the store although every head it holds matched, or None."""
        if self.bad:
            listed = ", ".join(str(n) for n in self.bad[:MAX_BAD_LOG_LINES])
            more = " and more" if len(self.bad) > MAX_BAD_LOG_LINES else ""
            return (
                f"audit_head lines with an invalid MAC or fields (forged, edited, or signed with "
                f"another key): line {listed}{more}"
            )
        if not self.valid:
            return "no audit_head lines found (the bridge logs them at INFO: is this the right file?)"
        return None


def run_purge(settings: Settings, older_than_days: int | None = None, out: TextIO = sys.stdout) -> int:
    """Verify, then purge the verified prefix older than the retention; refuse if it does not verify."""
    opened = _open(settings, out)
    if opened is None:
        return 2
    store, keys = opened
    days = settings.audit_retention_days if older_than_days is None else older_than_days
    cutoff = retention_cutoff(utc_now(), days)
    try:
        sealed = SealedHeadFile(head_path(settings.audit_db), HeadSigner(keys.head_key))
        count = purge(store, keys.chain_key, sealed_heads(sealed), cutoff, lambda: format_ts(utc_now()))
    except AuditChainBroken as exc:
        print(f"REFUSING TO PURGE {settings.audit_db}: {exc}; nothing was deleted", file=out)
        return 1
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
                out.write(
                    json.dumps({**rec.row(), "prev_hash": rec.prev_hash, "hash": rec.hash}, separators=(",", ":"))
                    + "\n"
                )
    finally:
        store.close()
    return 0


def run_backup(settings: Settings, path: str, out: TextIO = sys.stdout) -> int:
    """Copy the store with SQLite's online backup, copy a generated key beside it, verify the copy."""
    opened = _open(settings, out)
    if opened is None:
        return 2
    store, keys = opened
    signer = HeadSigner(keys.head_key)
    try:
        existing = [p for p in (path, key_path(path), head_path(path)) if os.path.lexists(p)]
        if existing:
            print(f"refusing to overwrite {existing[0]}", file=out)
            return 2
        try:  # read before the copy is taken, so the copy holds at least this head
            heads = sealed_heads(SealedHeadFile(head_path(settings.audit_db), signer))
        except AuditChainBroken as exc:
            return _report(VerifyResult(False, 0, None, exc.reason), settings.audit_db, out)
        try:
            store.backup(path)
            if not settings.audit_hash_key:  # without its key a backup cannot be verified
                write_key_file(path, load_master_key(settings.audit_db, create=False))
        except (ConfigError, FileExistsError) as exc:
            print(f"cannot back up to {path}: {exc}", file=out)
            return 2
    finally:
        store.close()
    for head in heads:  # the copy carries its own anchor
        SealedHeadFile(head_path(path), signer).write(head)
    copy = SQLiteStore(path, create=False)
    try:
        return _report(verify(copy, keys.chain_key, heads), path, out)
    finally:
        copy.close()


def add_audit_commands(
    subparsers: Any, settings_factory: SettingsFactory, parents: list[argparse.ArgumentParser] | None = None
) -> None:
    """Add ``audit verify|purge|export|backup``; each parser gets ``func(args) -> exit code``.

    ``parents`` adds shared options (``--env-file``) to every command, so they may follow it.
    """
    shared = parents or []
    audit = subparsers.add_parser("audit", help="verify, purge, export or back up the audit trail", parents=shared)
    commands = audit.add_subparsers(dest="audit_command", required=True)
    verify_cmd = commands.add_parser(
        "verify", help="check the tamper-evident chain and its anchored heads", parents=shared
    )
    verify_cmd.add_argument(
        "--heads-from", metavar="LOGFILE", default=None, help="also check every audit_head line of this log file"
    )
    verify_cmd.set_defaults(func=lambda a: run_verify(settings_factory(a), heads_from=a.heads_from))
    purge = commands.add_parser("purge", help="delete records older than the retention", parents=shared)
    purge.add_argument("--older-than-days", type=_days, default=None, metavar="DAYS")
    purge.set_defaults(func=lambda a: run_purge(settings_factory(a), a.older_than_days))
    export = commands.add_parser("export", help="write every record as JSON lines", parents=shared)
    export.add_argument("--output", "-o", default="-", help="file (default: stdout)")
    export.set_defaults(func=lambda a: _export_to(settings_factory(a), a.output))
    backup = commands.add_parser("backup", help="online copy of the store, verified", parents=shared)
    backup.add_argument("path")
    backup.set_defaults(func=lambda a: run_backup(settings_factory(a), a.path))


def _days(text: str) -> int:
    """``--older-than-days``: a whole number >= 0 (a negative one would purge everything, even
    records written while the purge runs)."""
    try:
        days = int(text)
    except ValueError:
        days = -1
    if days < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number of days >= 0, got {text!r}")
    return days


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
    try:  # the export holds personal data: a file of ours, 0600, never through a symlink
        fd = open_output(output)
    except (ConfigError, OSError) as exc:
        print(f"cannot write {output}: {exc}", file=sys.stderr)
        return 2
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        return run_export(settings, f)


def _open(settings: Settings, out: TextIO) -> tuple[SQLiteStore, AuditKeys] | None:
    """The store and its keys, checked as the bridge checks them; None (after one line) if not."""
    try:
        store = SQLiteStore(settings.audit_db, create=False)
    except FileNotFoundError:
        print(
            f"no audit store at {settings.audit_db} (AUDIT_DB; give the server's settings, e.g. --env-file)", file=out
        )
        return None
    except (ConfigError, OSError, sqlite3.DatabaseError) as exc:  # unsafe, unreadable, or not a database
        print(f"cannot open the audit store {settings.audit_db}: {exc}", file=out)
        return None
    try:
        return store, load_keys(settings.audit_db, settings.audit_hash_key, create=False)
    except (ConfigError, OSError) as exc:
        store.close()
        print(f"cannot load the audit key: {exc}", file=out)
        return None


def _report(result: VerifyResult, where: str, out: TextIO) -> int:
    if result.ok:
        print(f"audit chain OK: {result.checked} records verified in {where}", file=out)
        return 0
    print(
        f"audit chain BROKEN in {where} at record {result.first_bad_id}: {result.reason} "
        f"({result.checked} records read)",
        file=out,
    )
    return 1
