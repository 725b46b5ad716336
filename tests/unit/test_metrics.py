"""Prometheus metrics: the rendered text parses with prometheus_client's own parser and adds up."""

from __future__ import annotations

import time

from prometheus_client.parser import text_string_to_metric_families

from bridge.metrics import LATENCY_BUCKETS, BridgeMetrics
from bridge.stats import FanOut, StreamStats
from bridge.stream.session import GAP_BATCH
from bridge.types import StreamResult


def samples(metrics: BridgeMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def test_histograms_and_counters_match_observations() -> None:
    metrics = BridgeMetrics()
    gaps = [0.0005, 0.002, 0.002, 0.03, 0.7, 12.0]
    metrics.stream_opened()
    metrics.stream_opened()
    metrics.first_token(0.08)
    metrics.token_gaps(gaps[:2])
    metrics.token_gaps(gaps[2:])
    metrics.stream_closed(StreamResult("s1", "r1", "completed", 7, 900.0, 80.0))
    metrics.reconnected()
    metrics.rate_limited("rate")
    metrics.rate_limited("rate")
    metrics.audit_dropped(3)
    metrics.rate_limit_storage_failed()
    metrics.connection_opened()

    got = samples(metrics)
    assert got[("bridge_inter_token_seconds_count", ())] == len(gaps)
    assert abs(got[("bridge_inter_token_seconds_sum", ())] - sum(gaps)) < 1e-9
    for bound in LATENCY_BUCKETS:
        expected = sum(1 for g in gaps if g <= bound)
        assert got[("bridge_inter_token_seconds_bucket", (("le", repr(float(bound))),))] == expected
    assert got[("bridge_inter_token_seconds_bucket", (("le", "+Inf"),))] == len(gaps)
    assert got[("bridge_first_token_seconds_count", ())] == 1
    assert got[("bridge_first_token_seconds_bucket", (("le", "0.1"),))] == 1
    assert got[("bridge_first_token_seconds_bucket", (("le", "0.05"),))] == 0
    assert got[("bridge_streams_total", (("error_code", ""), ("outcome", "completed")))] == 1
    assert got[("bridge_open_streams", ())] == 1
    assert got[("bridge_open_connections", ())] == 1
    assert got[("bridge_tokens_total", ())] == 7
    assert got[("bridge_reconnections_total", ())] == 1
    assert got[("bridge_rate_limited_total", (("reason", "rate"),))] == 2
    assert got[("bridge_audit_dropped_total", ())] == 3
    assert got[("bridge_rate_limit_storage_errors_total", ())] == 1
    assert got[("bridge_stream_duration_seconds_count", (("outcome", "completed"),))] == 1


def test_error_outcomes_are_labelled_by_code() -> None:
    metrics = BridgeMetrics()
    metrics.stream_opened()
    metrics.stream_closed(StreamResult("s", "r", "error", 0, 5.0, None, error_code="upstream_unavailable"))
    got = samples(metrics)
    assert got[("bridge_streams_total", (("error_code", "upstream_unavailable"), ("outcome", "error")))] == 1
    assert got[("bridge_open_streams", ())] == 0


def test_two_apps_have_separate_registries() -> None:
    a, b = BridgeMetrics(), BridgeMetrics()
    a.token_gaps([0.01])
    assert samples(a)[("bridge_inter_token_seconds_count", ())] == 1
    assert samples(b)[("bridge_inter_token_seconds_count", ())] == 0


def test_per_token_cost_is_small() -> None:
    """Prints ns per gap in batches of GAP_BATCH (best of 5 rounds, noisy host); loose bound."""
    metrics, stats = BridgeMetrics(), StreamStats(300)
    fan = FanOut(metrics, stats)
    batch = [0.004] * GAP_BATCH
    n, rounds = 20_000 // GAP_BATCH, 5
    report = []
    for name, observer in (("metrics", metrics), ("stats", stats), ("fanout", fan)):
        best = float("inf")
        for _ in range(rounds):
            started = time.perf_counter_ns()
            for _ in range(n):
                observer.token_gaps(batch)
            best = min(best, (time.perf_counter_ns() - started) / (n * GAP_BATCH))
        report.append(f"{name}={best:.0f}ns")
        assert best < 50_000
    print("token gap cost per gap:", " ".join(report))
    assert samples(metrics)[("bridge_inter_token_seconds_count", ())] == 2 * n * rounds * GAP_BATCH


def test_resume_store_counters_are_exported_at_scrape_time() -> None:
    metrics = BridgeMetrics()
    stats: dict[str, int | bool] = {"frames_written": 3, "remote_resumes": 0, "store_down": False}
    metrics.watch_resume_store(lambda: stats)
    got = samples(metrics)
    assert got[("bridge_resume_store_frames_written_total", ())] == 3
    assert got[("bridge_resume_store_down", ())] == 0
    stats.update(remote_resumes=2, store_down=True)
    got = samples(metrics)
    assert got[("bridge_resume_store_remote_resumes_total", ())] == 2
    assert got[("bridge_resume_store_down", ())] == 1
