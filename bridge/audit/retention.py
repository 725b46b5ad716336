"""Retention: which records may be purged, decided from the verified chain only.

Age comes from the ``ts`` inside each *verified* body, never from the indexed ``ts`` column, and
nothing is purged unless the whole chain (and the sealed head) verifies. Before this, backdating
the ``ts`` of recent records made ``audit purge`` delete them and write a valid checkpoint over
the gap, turning tampering into a clean-looking retention run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from bridge.audit.anchor import AnchoredHead, SealedHeadFile
from bridge.audit.chain import Chain, inspect
from bridge.audit.events import checkpoint_event
from bridge.audit.store import AuditStore, CheckpointBuilder, Link
from bridge.errors import AuditChainBroken


def sealed_heads(sealed: SealedHeadFile | None) -> list[AnchoredHead]:
    """The sealed head as a list (empty if there is none); AuditChainBroken if it is not valid."""
    if sealed is None:
        return []
    try:
        head = sealed.read()
    except ValueError as exc:
        raise AuditChainBroken(None, str(exc)) from None
    return [] if head is None else [head]


def plan_purge(store: AuditStore, chain_key: bytes, heads: Sequence[AnchoredHead], cutoff: str) -> Link | None:
    """The last record to purge (None: nothing is old enough); AuditChainBroken if it does not verify."""
    inspection = inspect(store, chain_key, heads, cutoff)
    if not inspection.result.ok:
        raise AuditChainBroken(inspection.result.first_bad_id, inspection.result.reason)
    return inspection.purge_through


def checkpoint_builder(now: Callable[[], str], cutoff: str) -> CheckpointBuilder:
    """The checkpoint a purge appends, vouching for the deleted prefix."""

    def build(count: int, last: Link) -> Mapping[str, Any]:
        return checkpoint_event(now(), count, last.id, last.hash, cutoff).body

    return build


def purge(
    store: AuditStore, chain_key: bytes, heads: Sequence[AnchoredHead], cutoff: str, now: Callable[[], str]
) -> int:
    """Verify, then delete the verified prefix older than ``cutoff`` (in one process, e.g. the CLI)."""
    last = plan_purge(store, chain_key, heads, cutoff)
    if last is None:
        return 0
    return store.purge_through(last, Chain(chain_key), checkpoint_builder(now, cutoff))
