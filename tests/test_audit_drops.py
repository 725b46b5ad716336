"""Drop accounting of the audit trail, in-process (bridge/audit/trail.py)."""

from __future__ import annotations

import logging

import pytest

from bridge.audit.trail import DropCounter


def test_every_drop_reaches_the_hook_but_the_log_is_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[tuple[str, int]] = []
    drops = DropCounter(lambda reason, count: seen.append((reason, count)), log_interval_s=3600.0)
    with caplog.at_level(logging.ERROR, logger="bridge.audit"):
        for _ in range(1000):
            drops.add("queue_full", 1)
    assert drops.total == 1000 and len(seen) == 1000
    assert len([r for r in caplog.records if "AUDIT EVENTS DROPPED" in r.message]) == 1


def test_a_failing_hook_does_not_lose_the_count(caplog: pytest.LogCaptureFixture) -> None:
    def broken(reason: str, count: int) -> None:
        raise RuntimeError("metrics down")

    drops = DropCounter(broken, log_interval_s=0.0)
    drops.add("write_error", 3)
    drops.add("closed", 2)
    assert drops.total == 5
    assert any("on_drop hook failed" in r.message for r in caplog.records)
