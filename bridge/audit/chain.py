"""Tamper evidence: every record is chained to the previous one with a keyed hash.

``hash = HMAC(chain_key, prev_hash || id || canonical_json(body))``. Keyed, so someone holding only
the database file cannot rewrite a record and recompute the chain after it (a plain SHA-256 chain
can be rebuilt by anyone). The id is inside the MAC, so moving a record to another id is caught
even if its neighbours were moved with it. The head (last id and hash) is MAC'd too, which is what
catches deletion of the *last* record, the one no successor points to.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from bridge.audit.store import GENESIS, AuditStore, Head, Link, StoredRecord, canonical_json


class Chain:
    """The ``Sealer`` for one chain key."""

    def __init__(self, chain_key: bytes) -> None:
        self._key = chain_key

    def seal(self, prev_hash: str, record_id: int, body: Mapping[str, Any]) -> str:
        message = f"{prev_hash}\n{record_id}\n{canonical_json(body)}".encode()
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


def verify(store: AuditStore, chain_key: bytes) -> VerifyResult:
    """Walk the whole chain; on failure name the first broken record and why.

    A store that was purged starts with a record whose ``prev_hash`` is not GENESIS; that is
    accepted only if the newest retention checkpoint vouches for exactly that id and hash, so
    deleting records at the front by hand is still detected.
    """
    chain = Chain(chain_key)
    with store.snapshot() as snap:
        return _walk(chain, snap.head, snap.records)


def _walk(chain: Chain, head: Head | None, records: Iterable[StoredRecord]) -> VerifyResult:
    first: StoredRecord | None = None
    prev: StoredRecord | None = None
    vouched: tuple[int, str] | None = None
    failure: tuple[int, str] | None = None
    checked = 0
    for rec in records:
        checked += 1
        first = first or rec
        if failure is None:
            if prev is not None and rec.prev_hash != prev.hash:
                failure = (rec.id, f"prev_hash does not match record {prev.id}: "
                                   "a record between them was deleted, inserted or moved")
            elif not hmac.compare_digest(chain.seal(rec.prev_hash, rec.id, rec.body), rec.hash):
                failure = (rec.id, "hash mismatch: the record was edited or moved")
        if rec.body.get("event_type") == "retention_checkpoint":
            vouched = (int(rec.body["last_purged_id"]), str(rec.body["last_purged_hash"]))
        prev = rec
    if first is not None and first.prev_hash != GENESIS and vouched != (first.id - 1, first.prev_hash):
        return VerifyResult(False, checked, first.id,
                            "records before it are missing and no retention checkpoint accounts for them")
    if failure is not None:
        return VerifyResult(False, checked, failure[0], failure[1])
    return _check_head(chain, head, prev, checked)


def _check_head(chain: Chain, head: Head | None, last: StoredRecord | None, checked: int) -> VerifyResult:
    if head is None:
        if last is None:
            return VerifyResult(True, 0)
        return VerifyResult(False, checked, last.id, "chain head is missing")
    if not hmac.compare_digest(chain.seal_head(head.link), head.mac):
        reason = "chain head MAC is invalid: wrong key or edited head"
        return VerifyResult(False, checked, head.link.id, reason)
    if last is None or last.id < head.link.id:
        end = "the store is empty" if last is None else f"the store ends at record {last.id}"
        return VerifyResult(False, checked, head.link.id, f"record {head.link.id} is missing: {end}")
    if last.id != head.link.id or last.hash != head.link.hash:
        return VerifyResult(False, checked, last.id, f"record {last.id} is not the chain head {head.link.id}")
    return VerifyResult(True, checked)
