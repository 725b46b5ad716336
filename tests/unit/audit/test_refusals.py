"""RefusalLedger in-process: refusals become at most two records per subject, reason and window,
the table stays bounded whatever the number of addresses, and no count is lost on close."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bridge.audit.events import SecurityKind
from bridge.audit.keys import derive_keys
from bridge.audit.refusals import MAX_PATH_CHARS, OVERFLOW_ADDRESS, RefusalLedger
from bridge.audit.store import QueryFilters, SQLiteStore
from bridge.audit.trail import AuditTrail
from bridge.types import Identity

ANON = Identity(client_ip="203.0.113.7")
MEMBER = Identity(client_ip="198.51.100.4", user_id="m1", role="member", email="m1@example.com", authenticated=True)


class Clock:
    """Monotonic seconds the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.5

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def trail(tmp_path: Path) -> AsyncIterator[AuditTrail]:
    trail = AuditTrail(SQLiteStore(tmp_path / "audit.sqlite3"), derive_keys(b"r" * 32))
    await trail.start()
    yield trail
    await trail.aclose()


async def bodies(trail: AuditTrail, kind: str = "auth_failed") -> list[dict[str, Any]]:
    await trail.flush()
    records = await trail.query(QueryFilters(event_type=kind), limit=1000)
    return [dict(r.body) for r in reversed(records)]


def refuse(
    ledger: RefusalLedger,
    identity: Identity = ANON,
    times: int = 1,
    *,
    kind: SecurityKind = "auth_failed",
    reason: str = "INVALID_TOKEN",
    path: str = "/api/v2/bali-zero/chat",
) -> None:
    for i in range(times):
        ledger.refused(kind, identity, request_id=f"r{i}", trace_id=None, path=path, reason=reason)


async def test_first_refusal_is_written_at_once_and_the_rest_as_one_count(trail: AuditTrail) -> None:
    ledger = RefusalLedger(trail, 60, clock=Clock())
    refuse(ledger, times=500)
    assert [r["count"] for r in await bodies(trail)] == [1]
    assert ledger.flush() == 1
    first, folded = await bodies(trail)
    assert (first["count"], folded["count"]) == (1, 499)
    assert first["request_id"] == "r0" and folded["request_id"] == "r1"  # the first one each stands for
    assert first["first_ts"] == first["ts"] <= folded["first_ts"] <= folded["ts"]
    assert first["client_ip"] == folded["client_ip"] == "203.0.113.7"


async def test_each_window_leaves_at_most_two_records_per_subject_and_reason(trail: AuditTrail) -> None:
    clock = Clock()
    ledger = RefusalLedger(trail, 60, clock=clock)
    for _ in range(5):  # five windows
        refuse(ledger, times=100)
        refuse(ledger, times=10, reason="TOKEN_EXPIRED")
        clock.now += 60
    refuse(ledger)  # opens the sixth window, closing the fifth
    records = await bodies(trail)
    assert len(records) == 5 * 4 + 1
    assert sum(r["count"] for r in records) == 5 * 110 + 1
    assert {r["reason"] for r in records} == {"INVALID_TOKEN", "TOKEN_EXPIRED"}


async def test_addresses_of_one_ipv6_64_are_one_subject_shown_as_the_block(trail: AuditTrail) -> None:
    ledger = RefusalLedger(trail, 60, clock=Clock())
    for host in range(300):
        refuse(ledger, Identity(client_ip=f"2001:db8:5:6:{host:x}::9"))
    refuse(ledger, Identity(client_ip="2001:db8:5:7::1"))
    ledger.flush()
    shown = [(r["client_ip"], r["count"]) for r in await bodies(trail)]
    assert shown == [("2001:db8:5:6::/64", 1), ("2001:db8:5:7::/64", 1), ("2001:db8:5:6::/64", 299)]


async def test_many_addresses_keep_the_table_and_the_records_bounded(trail: AuditTrail) -> None:
    ledger = RefusalLedger(trail, 60, max_entries=8, clock=Clock())
    for n in range(5000):
        refuse(ledger, Identity(client_ip=f"10.{n // 250}.{n % 250}.1"), times=2)
        assert len(ledger) <= 8 + 1  # plus the one overflow entry of this (type, reason)
    ledger.flush()
    records = await bodies(trail)
    assert len(records) <= 2 * (8 + 1)
    assert sum(r["count"] for r in records) == 10_000
    overflow = [r for r in records if r["client_ip"] == OVERFLOW_ADDRESS]
    assert sum(r["count"] for r in overflow) == 2 * (5000 - 8)


async def test_identified_callers_are_their_own_subject_with_their_identity(trail: AuditTrail) -> None:
    """An admin read refused to a verified member names the member (and only a verified email)."""
    ledger = RefusalLedger(trail, 60, clock=Clock())
    refuse(ledger, MEMBER, times=3, reason="FORBIDDEN")
    refuse(ledger, Identity(client_ip="198.51.100.4"), reason="FORBIDDEN")  # anonymous, same address
    ledger.flush()
    records = await bodies(trail)
    anonymous = trail.events.user_id(Identity(client_ip="198.51.100.4"))
    assert [(r["user_id"], r["count"]) for r in records] == [("m1", 1), (anonymous, 1), ("m1", 2)]
    assert [r.get("email") for r in records] == ["m1@example.com", None, "m1@example.com"]


async def test_rate_limited_and_auth_failed_are_folded_apart(trail: AuditTrail) -> None:
    ledger = RefusalLedger(trail, 60, clock=Clock())
    refuse(ledger, times=4)
    refuse(ledger, times=6, kind="rate_limited", reason="RATE_LIMITED")
    ledger.flush()
    assert [r["count"] for r in await bodies(trail)] == [1, 3]
    assert [r["count"] for r in await bodies(trail, "rate_limited")] == [1, 5]


async def test_close_writes_the_open_window_and_later_refusals_one_by_one(trail: AuditTrail) -> None:
    ledger = RefusalLedger(trail, 3600, clock=Clock())
    refuse(ledger, times=40)
    await ledger.aclose()
    refuse(ledger, times=2)
    assert [r["count"] for r in await bodies(trail)] == [1, 39, 1, 1]
    assert len(ledger) == 0


async def test_a_client_chosen_path_is_bounded(trail: AuditTrail) -> None:
    ledger = RefusalLedger(trail, 60, clock=Clock())
    refuse(ledger, times=2, path="/api/v2/bali-zero/chat-stream/" + "a" * 30_000)
    ledger.flush()
    assert {len(r["path"]) for r in await bodies(trail)} == {MAX_PATH_CHARS}
