"""Audit storage: a small interface and its SQLite implementation.

The trail and the verifier talk only to ``AuditStore``, so another SQL database can be added by
implementing it. What an implementation must guarantee (the SQLite one does):

* ``append_batch`` reads the chain head, seals and inserts the batch and moves the head in ONE
  write transaction, so two processes sharing a store cannot fork the chain;
* ``purge_through`` deletes a contiguous *prefix* by id, up to a record the caller verified (its
  hash is re-checked inside the write transaction), and appends the checkpoint in the same
  transaction: which records are old is decided by the verifier from the chained bodies, never
  from a column an attacker can rewrite (a backdated ``ts`` would get minutes-old records purged), and
  a crash between delete and checkpoint would leave a chain that can never verify again;
* ``snapshot`` reads the head and all records in one read transaction, so a verify racing a writer
  does not see a head newer than the records (a false "tampered" alarm); ``hash_at`` answers
  point lookups inside that same transaction (to check anchored heads);
* every string is stored so that SQL gives it back unchanged (``storable``), and reads never
  fail on text that is not UTF-8 (a hostile edit): one bad row must not make the whole trail
  unreadable, to the admin API and to verify alike.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

from bridge.safefiles import PRIVATE_DIRECTORY, TrustedDirectory

GENESIS = "0" * 64
"""The ``prev_hash`` of the first record ever written."""


@dataclass(frozen=True, slots=True)
class Link:
    """A position in the chain: a record id and its hash (``Link(0, GENESIS)`` before any record)."""

    id: int
    hash: str


@dataclass(frozen=True, slots=True)
class Head:
    """The stored chain head; ``mac`` lets verify notice a deleted tail record."""

    link: Link
    mac: str


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """A row as stored: ``raw`` is the body text, ``columns`` what SQL filters see (ts, type, user).

    ``body`` is the parsed ``raw`` (``{}`` if it does not parse). Verify compares all three: a body
    with a duplicate key parses to the *last* value in Python but ``json_extract`` indexes the
    *first*, so an edit can change what the admin filters and purge see while the MAC still holds.
    """

    id: int
    body: dict[str, Any]
    prev_hash: str
    hash: str
    raw: str = ""
    columns: tuple[Any, Any, Any] = (None, None, None)

    def row(self) -> dict[str, Any]:
        """The record as the admin API and export show it."""
        return {"id": self.id, **self.body}


@dataclass(frozen=True, slots=True)
class Edges:
    """The ends of what is stored, read without a walk: ``first`` is (first id, its prev_hash)."""

    first: Link | None
    last_id: int | None


INDEXED_FIELDS = ("ts", "event_type", "user_id")
"""The body fields SQLite indexes as generated columns, in ``StoredRecord.columns`` order."""


@dataclass(frozen=True, slots=True)
class ChainSnapshot:
    head: Head | None
    records: Iterator[StoredRecord]
    hash_at: Callable[[int], str | None]


@dataclass(frozen=True, slots=True)
class QueryFilters:
    """Admin read filters; ``since``/``until`` are ``format_ts`` strings, ``before_id`` a cursor."""

    event_type: str | None = None
    user_id: str | None = None
    since: str | None = None
    until: str | None = None
    before_id: int | None = None


class Sealer(Protocol):
    """Computes record and head hashes (bridge/audit/chain.py); the store never sees the key."""

    def seal(self, prev_hash: str, record_id: int, body: Mapping[str, Any]) -> str: ...

    def seal_head(self, link: Link) -> str: ...


CheckpointBuilder = Callable[[int, Link], Mapping[str, Any]]
"""(purged_count, last purged link) -> the checkpoint record's body."""


class AuditStore(Protocol):
    def append_batch(self, bodies: Sequence[Mapping[str, Any]], sealer: Sealer) -> Link: ...

    def purge_through(self, last: Link, sealer: Sealer, checkpoint: CheckpointBuilder) -> int: ...

    def snapshot(self) -> AbstractContextManager[ChainSnapshot]: ...

    def locked(self) -> AbstractContextManager[None]: ...

    def head(self) -> Head | None: ...

    def edges(self) -> Edges: ...

    def hash_at(self, record_id: int) -> str | None: ...

    def query(self, filters: QueryFilters, limit: int, offset: int = 0) -> list[StoredRecord]: ...

    def count(self) -> int: ...

    def backup(self, dest: str | os.PathLike[str]) -> None: ...

    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_records (
    id INTEGER PRIMARY KEY,
    body TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    ts TEXT GENERATED ALWAYS AS (json_extract(body, '$.ts')) VIRTUAL,
    event_type TEXT GENERATED ALWAYS AS (json_extract(body, '$.event_type')) VIRTUAL,
    user_id TEXT GENERATED ALWAYS AS (json_extract(body, '$.user_id')) VIRTUAL
);
CREATE INDEX IF NOT EXISTS audit_records_ts ON audit_records (ts);
CREATE INDEX IF NOT EXISTS audit_records_type ON audit_records (event_type, id);
CREATE INDEX IF NOT EXISTS audit_records_user ON audit_records (user_id, id);
CREATE TABLE IF NOT EXISTS audit_chain_head (
    singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
    last_id INTEGER NOT NULL,
    last_hash TEXT NOT NULL,
    mac TEXT NOT NULL
);
"""


def canonical_json(body: Mapping[str, Any]) -> str:
    """The one serialisation used both to store and to hash a record (sorted keys, no spaces).

    ASCII-only, so the body column itself is always valid UTF-8 whatever its strings hold. That
    is not enough for the indexed columns, which SQLite decodes out of the escapes: see ``storable``.
    """
    return json.dumps(dict(body), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")


def storable(value: Any) -> Any:
    """``value`` with every string one that SQLite's JSON functions give back unchanged.

    Two kinds of character do not survive ``json_extract``, which computes the indexed columns:
    a lone surrogate (``"a\\ud800"`` is legal JSON and a legal Python str, but not UTF-8: the
    column would hold bytes no reader can decode, failing every read of the trail) and NUL (it
    ends the string: ``"alice\\u0000x"`` would be indexed as the user ``alice``). Each is written
    as the six visible characters ``\\uXXXX``, so the record is kept and still shows what was sent.
    Keys, nested objects and lists are cleaned alike; other values are returned as they are.
    """
    if isinstance(value, str):
        return _UNSTORABLE.sub(lambda m: f"\\u{ord(m.group()):04x}", value)
    if isinstance(value, Mapping):
        return {storable(k): storable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [storable(v) for v in value]
    return value


def read_text(data: bytes) -> str:
    """How every connection of the store decodes TEXT: bytes that are not UTF-8 become lone surrogates.

    Strict decoding raises on every read that touches such a value (an edit of the file, or a
    column SQLite computed from a lone surrogate escape), so one record would make the admin API
    answer 500 and verify give up on the whole store. Decoded with ``surrogateescape`` the row is
    read like any other, verify names it, and ``encode("utf-8", "surrogateescape")`` gives the
    original bytes back.
    """
    return data.decode("utf-8", "surrogateescape")


class SQLiteStore:
    """``AuditStore`` on a SQLite file in WAL mode with ``synchronous=NORMAL``.

    Writes go through one connection (the trail's writer thread); reads open their own short-lived
    connection so an admin query never waits behind, or blocks, a batch insert. ``secure_delete``
    makes purged records unreadable in the file, not just unlinked (retention must really erase).
    """

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout_ms: int = 5000, create: bool = True) -> None:
        """Open (``create``: or create) the store; ``UnsafeFile`` or ``FileNotFoundError`` before SQLite runs.

        Call it once per store in a process: its checks open and close the store's files, and
        closing any descriptor of a file drops every POSIX lock this process holds on it,
        including those of a SQLite connection already open on the same store.
        """
        self.path = Path(path)
        self._busy_timeout_ms = busy_timeout_ms
        claim_store_files(self.path, create=create)
        self._conn = self._connect()
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.executescript(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(store_uri(self.path), uri=True, isolation_level=None, check_same_thread=False)
        conn.text_factory = read_text
        conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_ms)}")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA secure_delete=ON")
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the store's write lock (every process's appends wait): what the head anchor reads
        and seals under it cannot be overtaken by another worker's append or seal."""
        with self._write():
            yield

    def append_batch(self, bodies: Sequence[Mapping[str, Any]], sealer: Sealer) -> Link:
        with self._write() as conn:
            return self._append(conn, bodies, sealer)

    def purge_through(self, last: Link, sealer: Sealer, checkpoint: CheckpointBuilder) -> int:
        """Delete records ``1..last.id`` and append the checkpoint; 0 if ``last`` is no longer there.

        ``last`` comes from a verify that ran in an earlier read transaction (verify is O(n) and
        must not hold the write lock); re-checking its hash here means the checkpoint vouches for
        exactly the record that was verified, whatever happened in between.
        """
        with self._write() as conn:
            row = conn.execute("SELECT hash FROM audit_records WHERE id = ?", (last.id,)).fetchone()
            if row is None or str(row[0]) != last.hash:
                return 0
            count = int(conn.execute("SELECT count(*) FROM audit_records WHERE id <= ?", (last.id,)).fetchone()[0])
            conn.execute("DELETE FROM audit_records WHERE id <= ?", (last.id,))
            self._append(conn, [checkpoint(count, last)], sealer)
        with contextlib.suppress(sqlite3.OperationalError):  # busy readers: the next checkpoint does it
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # purged pages leave the WAL too
        return count

    def _append(self, conn: sqlite3.Connection, bodies: Sequence[Mapping[str, Any]], sealer: Sealer) -> Link:
        row = conn.execute("SELECT last_id, last_hash FROM audit_chain_head").fetchone()
        if row is not None:
            prev = Link(int(row[0]), str(row[1]))
        else:  # no head yet; with records present this restarts at GENESIS, which verify flags
            max_id = conn.execute("SELECT coalesce(max(id), 0) FROM audit_records").fetchone()[0]
            prev = Link(int(max_id), GENESIS)
        rows = []
        for original in bodies:
            body = storable(original)
            record_id = prev.id + 1
            digest = sealer.seal(prev.hash, record_id, body)
            rows.append((record_id, canonical_json(body), prev.hash, digest))
            prev = Link(record_id, digest)
        conn.executemany("INSERT INTO audit_records (id, body, prev_hash, hash) VALUES (?, ?, ?, ?)", rows)
        conn.execute(
            "INSERT INTO audit_chain_head (singleton, last_id, last_hash, mac) VALUES (1, ?, ?, ?) "
            "ON CONFLICT (singleton) DO UPDATE SET last_id = excluded.last_id, "
            "last_hash = excluded.last_hash, mac = excluded.mac",
            (prev.id, prev.hash, sealer.seal_head(prev)),
        )
        return prev

    @contextmanager
    def snapshot(self) -> Iterator[ChainSnapshot]:
        conn = self._connect()
        try:
            conn.execute("BEGIN")
            row = conn.execute("SELECT last_id, last_hash, mac FROM audit_chain_head").fetchone()
            head = Head(Link(int(row[0]), str(row[1])), str(row[2])) if row else None
            cursor = conn.execute(f"SELECT {_COLUMNS} FROM audit_records ORDER BY id")

            def hash_at(record_id: int) -> str | None:
                found = conn.execute("SELECT hash FROM audit_records WHERE id = ?", (record_id,)).fetchone()
                return None if found is None else str(found[0])

            yield ChainSnapshot(head, (_record(r) for r in cursor), hash_at)
            conn.execute("COMMIT")
        finally:
            conn.close()

    def head(self) -> Head | None:
        """The stored head row (unverified: callers check its MAC)."""
        row = self._conn.execute("SELECT last_id, last_hash, mac FROM audit_chain_head").fetchone()
        return Head(Link(int(row[0]), str(row[1])), str(row[2])) if row else None

    def edges(self) -> Edges:
        row = self._conn.execute("SELECT min(id), max(id) FROM audit_records").fetchone()
        if row[0] is None:
            return Edges(None, None)
        prev = self._conn.execute("SELECT prev_hash FROM audit_records WHERE id = ?", (row[0],)).fetchone()
        return Edges(Link(int(row[0]), str(prev[0])), int(row[1]))

    def hash_at(self, record_id: int) -> str | None:
        row = self._conn.execute("SELECT hash FROM audit_records WHERE id = ?", (record_id,)).fetchone()
        return None if row is None else str(row[0])

    def query(self, filters: QueryFilters, limit: int, offset: int = 0) -> list[StoredRecord]:
        clauses: list[str] = []
        args: list[Any] = []
        for column, op, value in (
            ("event_type", "=", filters.event_type),
            ("user_id", "=", filters.user_id),
            ("ts", ">=", filters.since),
            ("ts", "<", filters.until),
            ("id", "<", filters.before_id),
        ):
            if value is not None:
                clauses.append(f"{column} {op} ?")
                args.append(value)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        conn = self._connect()
        try:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM audit_records {where} ORDER BY id DESC LIMIT ? OFFSET ?",
                (*args, limit, offset),
            ).fetchall()
        finally:
            conn.close()
        return [_record(r) for r in rows]

    def count(self) -> int:
        conn = self._connect()
        try:
            return int(conn.execute("SELECT count(*) FROM audit_records").fetchone()[0])
        finally:
            conn.close()

    def backup(self, dest: str | os.PathLike[str]) -> None:
        """A consistent copy while writers continue (WAL: the backup reads one snapshot)."""
        dest_path = Path(dest)
        claim_store_files(dest_path, create=True, exclusive=True)
        src, dst = self._connect(), sqlite3.connect(store_uri(dest_path), uri=True)
        try:
            src.backup(dst)
        finally:
            dst.close()
            src.close()

    def close(self) -> None:
        self._conn.close()


_COLUMNS = "id, body, prev_hash, hash, ts, event_type, user_id"

SQLITE_SIBLINGS = ("-wal", "-shm", "-journal")
"""The files SQLite keeps beside a database, opened by name whenever it needs them."""


def claim_store_files(path: Path, *, create: bool, exclusive: bool = False) -> None:
    """Check the store file, its directory and SQLite's siblings before SQLite opens them by name.

    The store is created here (``create``; ``exclusive``: it must not exist yet), owner-only from
    the first byte since it holds emails and IPs, so SQLite never creates it: ``store_uri``
    opens with ``mode=rw``. Every rule of ``bridge.safefiles`` applies: no symlink at the store or
    at ``-wal``/``-shm``/``-journal`` (through a dangling one SQLite would create the store wherever
    it points), all owned by the bridge's user, modes tightened to 0600 on their descriptors.

    Between these checks and SQLite's own opens (and the siblings SQLite creates and removes
    while it runs) the names could be swapped only by someone who can write the store's
    directory; ``TrustedDirectory`` has just established that no one but root and the bridge's
    user can, with no sticky exception for that directory, so that gap is closed.
    """
    flags = os.O_RDONLY | (os.O_CREAT if create else 0) | (os.O_EXCL if exclusive else 0)
    with TrustedDirectory.open(path.parent, create_mode=PRIVATE_DIRECTORY if create else None) as directory:
        os.close(directory.open_file(path.name, flags))
        for suffix in SQLITE_SIBLINGS:
            with contextlib.suppress(FileNotFoundError):
                os.close(directory.open_file(path.name + suffix, os.O_RDONLY))


def store_uri(path: Path) -> str:
    """A ``file:`` URI with ``mode=rw``: SQLite opens the file ``claim_store_files`` checked, and
    fails rather than create one if it is gone; quoting keeps ``?`` or ``#`` in a path literal."""
    return f"file:{quote(os.path.abspath(path))}?mode=rw"


def _record(row: tuple[Any, ...]) -> StoredRecord:
    raw = row[1] if isinstance(row[1], str) else str(row[1])
    return StoredRecord(int(row[0]), _parse(raw), str(row[2]), str(row[3]), raw, (row[4], row[5], row[6]))


def _parse(raw: str) -> dict[str, Any]:
    """The body as a dict, or ``{}`` for text an attacker made unparseable (verify then flags it)."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return {}
    return body if isinstance(body, dict) else {}
