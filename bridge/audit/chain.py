"""Tamper evidence: every record is chained to the previous one with a keyed hash.

``hash = HMAC(chain_key, prev_hash || id || canonical_json(body))``. Keyed, so someone holding only
the database file cannot rewrite a record and recompute the chain after it (a plain SHA-256 chain
can be rebuilt by anyone). The id is inside the MAC, so moving a record to another id is caught
even if its neighbours were moved with it. The head (last id and hash) is MAC'd too, which is what
catches deletion of the *last* record, the one no successor points to; heads anchored outside the
store (bridge/audit/anchor.py) catch deleting the tail *and* the head row, or the whole store.

The MAC covers the canonical serialisation, so verify also insists that the stored text *is* that
serialisation and that SQLite's indexed columns agree with it: otherwise a duplicate key prepended
to a body changes what SQL filters and retention see while the MAC still verifies.
"""

from __future__ import annotations

import hashlib
import hmac
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from bridge.audit.anchor import AnchoredHead, Coverage, check_head, digest_equal
from bridge.audit.store import (
    GENESIS,
    INDEXED_FIELDS,
    AuditStore,
    ChainSnapshot,
    Head,
    Link,
    StoredRecord,
    canonical_json,
    read_text,
)


class Chain:
    """The ``Sealer`` for one chain key."""

    def __init__(self, chain_key: bytes) -> None:
        self._key = chain_key

    def seal(self, prev_hash: str, record_id: int, body: Mapping[str, Any]) -> str:
        return self.seal_text(prev_hash, record_id, canonical_json(body))

    def seal_text(self, prev_hash: str, record_id: int, canonical: str) -> str:
        """``seal`` for a body already in canonical form (verify has it: the stored text)."""
        message = f"{prev_hash}\n{record_id}\n{canonical}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def seal_head(self, link: Link) -> str:
        return hmac.new(self._key, f"head\n{link.id}\n{link.hash}".encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class VerifyResult:
    ok: bool
    checked: int
    first_bad_id: int | None = None
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Inspection:
    """A verify result plus, when asked for a cutoff, the last record of the prefix older than it."""

    result: VerifyResult
    purge_through: Link | None = None


def verify(store: AuditStore, chain_key: bytes, heads: Iterable[AnchoredHead] = ()) -> VerifyResult:
    """Walk the whole chain, then check each anchored head; on failure name the record and why.

    A store that was purged starts with a record whose ``prev_hash`` is not GENESIS; that is
    accepted only if the newest retention checkpoint vouches for exactly that id and hash, so
    deleting records at the front by hand is still detected.
    """
    return inspect(store, chain_key, heads).result


def inspect(
    store: AuditStore, chain_key: bytes, heads: Iterable[AnchoredHead] = (), purge_cutoff: str | None = None
) -> Inspection:
    """``verify``, and with ``purge_cutoff`` also where a retention purge may cut.

    The cut is decided from the *verified* bodies' ``ts`` only (the prefix of records older than
    the cutoff), and only when everything verified: a backdated ``ts`` column, or a chain that
    does not verify, must never make retention delete records.
    """
    walk = _Walk(Chain(chain_key), purge_cutoff)
    try:
        with store.snapshot() as snap:
            for rec in snap.records:
                walk.add(rec)
            result = walk.result(snap.head)
            if result.ok:
                result = _check_heads(walk, snap, heads)
    except sqlite3.DatabaseError as exc:  # a dropped or replaced table is tampering too, not a crash
        if walk.failure is not None:  # a bad record was found before the read failed: name it
            return Inspection(VerifyResult(False, walk.checked, *walk.failure))
        where = f" after record {walk.last.id}" if walk.last is not None else ""
        return Inspection(
            VerifyResult(False, walk.checked, None, f"the store cannot be read as an audit store{where}: {exc}")
        )
    return Inspection(result, walk.old_through if result.ok else None)


def _check_heads(walk: _Walk, snap: ChainSnapshot, heads: Iterable[AnchoredHead]) -> VerifyResult:
    coverage = Coverage(
        walk.first.id if walk.first else None, walk.last.id if walk.last else None, walk.purged_through, snap.hash_at
    )
    for head in heads:
        mismatch = check_head(head, coverage)
        if mismatch is not None:
            return VerifyResult(False, walk.checked, mismatch.first_id, f"{mismatch.reason} (head signed at {head.ts})")
    return VerifyResult(True, walk.checked)


class _Walk:
    """State of one pass over the records in id order; remembers the first failure only."""

    def __init__(self, chain: Chain, purge_cutoff: str | None) -> None:
        self.chain = chain
        self.checked = 0
        self.first: StoredRecord | None = None
        self.last: StoredRecord | None = None
        self.failure: tuple[int, str] | None = None
        self.vouched: Link | None = None
        self.old_through: Link | None = None
        self._cutoff = purge_cutoff
        self._old_prefix = purge_cutoff is not None

    def add(self, rec: StoredRecord) -> None:
        self.checked += 1
        self.first = self.first or rec
        if self.failure is None:
            problem = _problem(self.chain, self.last, rec)
            if problem is not None:
                self.failure = (rec.id, problem)
            else:
                self._note(rec)
        self.last = rec

    def _note(self, rec: StoredRecord) -> None:
        """Facts from a record that verified: the checkpoint it is, whether it is past retention."""
        if rec.body.get("event_type") == "retention_checkpoint":
            purged_id, purged_hash = rec.body.get("last_purged_id"), rec.body.get("last_purged_hash")
            if isinstance(purged_id, int) and isinstance(purged_hash, str):
                self.vouched = Link(purged_id, purged_hash)
        if self._old_prefix:
            ts = rec.body.get("ts")
            if isinstance(ts, str) and self._cutoff is not None and ts < self._cutoff:
                self.old_through = Link(rec.id, rec.hash)
            else:
                self._old_prefix = False

    @property
    def purged_through(self) -> Link | None:
        """The purged prefix the store vouches for (None if it starts at GENESIS or is empty)."""
        if self.first is None or self.first.prev_hash == GENESIS:
            return None
        return Link(self.first.id - 1, self.first.prev_hash)

    def result(self, head: Head | None) -> VerifyResult:
        first = self.first
        if first is not None and first.prev_hash != GENESIS and self.vouched != self.purged_through:
            return VerifyResult(
                False,
                self.checked,
                first.id,
                "records before it are missing and no retention checkpoint accounts for them",
            )
        if self.failure is not None:
            return VerifyResult(False, self.checked, *self.failure)
        return _check_head(self.chain, head, self.last, self.checked)


def _problem(chain: Chain, prev: StoredRecord | None, rec: StoredRecord) -> str | None:
    """Why ``rec`` does not verify after ``prev``, or None."""
    if prev is not None and rec.prev_hash != prev.hash:
        return f"prev_hash does not match record {prev.id}: a record between them was deleted, inserted or moved"
    try:
        canonical = canonical_json(rec.body) if rec.body else None
    except ValueError:
        canonical = None
    if canonical != rec.raw:
        return (
            "the stored body is not its canonical serialisation "
            "(duplicate, reordered or extra keys, or not a JSON object): the record was edited"
        )
    for name, column in zip(INDEXED_FIELDS, rec.columns, strict=True):
        if not _indexes_as(rec.body.get(name), column):
            return f"the indexed column {name} disagrees with the chained body: the record was edited"
    if not digest_equal(chain.seal_text(rec.prev_hash, rec.id, rec.raw), rec.hash):  # raw is canonical here
        return "hash mismatch: the record was edited or moved"
    return None


def _indexes_as(value: Any, column: Any) -> bool:
    """Whether ``column`` is what SQLite's ``json_extract`` makes of the body value ``value``.

    For a string that is the value itself, except where SQLite cannot hold it: a lone surrogate
    escape becomes its three-byte encoding (``surrogatepass``), which the store reads back as three
    escaped bytes (``read_text``); and the result of a string with NUL is undefined in SQLite, the
    whole string or the part before the NUL. ``storable`` keeps both out of new records; records
    sealed with them are genuine and must still verify, or retention would refuse to purge forever.
    """
    if column == value or not isinstance(value, str) or not isinstance(column, str):
        return bool(column == value)
    encoded = value.encode("utf-8", "surrogatepass")
    return column in {read_text(encoded), read_text(encoded.split(b"\0", 1)[0])}


def _check_head(chain: Chain, head: Head | None, last: StoredRecord | None, checked: int) -> VerifyResult:
    if head is None:
        if last is None:
            return VerifyResult(True, 0)
        return VerifyResult(False, checked, last.id, "chain head is missing")
    if not digest_equal(chain.seal_head(head.link), head.mac):
        reason = "chain head MAC is invalid: wrong key or edited head"
        return VerifyResult(False, checked, head.link.id, reason)
    if last is None or last.id < head.link.id:
        end = "the store is empty" if last is None else f"the store ends at record {last.id}"
        return VerifyResult(False, checked, head.link.id, f"record {head.link.id} is missing: {end}")
    if last.id != head.link.id or last.hash != head.link.hash:
        return VerifyResult(False, checked, last.id, f"record {last.id} is not the chain head {head.link.id}")
    return VerifyResult(True, checked)
