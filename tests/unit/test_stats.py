"""Stream stats: exact percentiles while small, a window that forgets, and bounded memory."""

from __future__ import annotations

import random

import pytest

from bridge.stats import FanOut, StreamStats
from bridge.types import NullObserver, StreamResult


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_percentiles_of_a_known_sequence_are_exact() -> None:
    stats = StreamStats(60, clock=Clock())
    values = list(range(1, 101))
    random.Random(7).shuffle(values)
    stats.token_gaps([v / 1000 for v in values[:30]])  # 1..100 ms, in two batches
    stats.token_gaps([v / 1000 for v in values[30:]])
    inter = stats.snapshot()["inter_token_ms"]
    assert inter["count"] == 100
    assert inter["p50"] == pytest.approx(50)
    assert inter["p95"] == pytest.approx(95)
    assert inter["p99"] == pytest.approx(99)
    assert stats.snapshot()["first_token_ms"] == {"count": 0, "p50": None, "p95": None, "p99": None}


def test_window_forgets_old_samples() -> None:
    clock = Clock()
    stats = StreamStats(60, clock=clock)
    for _ in range(10):
        stats.first_token(5.0)  # slow, old
    clock.now += 30
    for _ in range(10):
        stats.first_token(0.1)
    assert stats.snapshot()["first_token_ms"]["count"] == 20
    assert stats.snapshot()["first_token_ms"]["p99"] == pytest.approx(5000)
    clock.now += 30.5  # the first batch is now more than 60 s old
    summary = stats.snapshot()["first_token_ms"]
    assert summary["count"] == 10 and summary["p99"] == pytest.approx(100)
    clock.now += 60
    assert stats.snapshot()["first_token_ms"]["count"] == 0


def test_memory_is_capped_and_estimates_stay_close() -> None:
    clock = Clock()
    stats = StreamStats(60, clock=clock, samples_per_bucket=256)
    rng = random.Random(3)
    values: list[float] = []
    for second in range(60):
        clock.now = 1000.0 + second
        for _ in range(2000 // 50):
            batch = [rng.expovariate(1 / 0.02) for _ in range(50)]
            values.extend(batch)
            stats.token_gaps(batch)
    kept = sum(len(b.samples) for b in stats._inter_token._buckets)
    assert kept <= 60 * 256
    values.sort()
    summary = stats.snapshot()["inter_token_ms"]
    assert summary["count"] == len(values)
    for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
        exact = values[int(q * len(values)) - 1] * 1000
        assert summary[name] == pytest.approx(exact, rel=0.1), name


def test_counts_outcomes_and_reconnections_and_fans_out() -> None:
    stats, other = StreamStats(300), StreamStats(300)
    fan = FanOut(stats, NullObserver(), other)
    for _ in range(3):
        fan.stream_opened()
    fan.first_token(0.01)
    fan.token_gaps([0.002])
    fan.stream_closed(StreamResult("a", "r", "completed", 3, 10.0, 1.0))
    fan.stream_closed(StreamResult("b", "r", "error", 0, 10.0, None, error_code="upstream_unavailable"))
    fan.reconnected()
    for snap in (stats.snapshot(), other.snapshot()):
        assert snap["open_streams"] == 1 and snap["streams_opened"] == 3
        assert snap["outcomes"] == {"completed": 1, "cancelled": 0, "error": 1}
        assert snap["error_codes"] == {"upstream_unavailable": 1}
        assert snap["reconnections"] == 1
        assert snap["inter_token_ms"]["count"] == 1 and snap["first_token_ms"]["p50"] == pytest.approx(10)
