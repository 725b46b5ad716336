"""The six benchmark scenarios, one function each: the load, then what is kept of it.

Goals (checked in ``bench/report.py``, never asserted: these are measurements, not tests):
  first_token_latency  1 client, 50 tokens; added = target - direct gRPC  [bridge added <= 0.5 x peer added]
  throughput           16 clients, 1 000-token streams; tokens/s          [bridge >= 0.7 x direct gRPC]
  paced_concurrency    50 ms pacing at rising stream counts; the knee      [>= 0.8 x direct, >= 1.5 x peer]
  idle_connections     streams waiting on a slow first token; RSS/stream   [<= 30 KiB]
  cancellation         streams closed mid-way; close -> stub `cancelled`   [p99 <= 20 ms]
  slow_reader          a reader that stops reading; RSS growth             [<= 2 MiB]
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from bench.harness import Group, Harness
from bench.procs import Sampler
from bench.results import (
    CancelResult,
    CancelTarget,
    IdleResult,
    IdleTarget,
    LatencyResult,
    LatencyTarget,
    PacedLevel,
    PacedResult,
    PacedTarget,
    ScenarioResult,
    SlowReaderResult,
    SlowReaderTarget,
    Summary,
    ThroughputResult,
    ThroughputTarget,
    merge_counts,
    per_1k_tokens,
    sub,
)
from bench.workload import FAST_REPEAT, log, words

IDLE_FIRST_TOKEN_DELAY_MS = 600_000
SLOW_READER_RCVBUF = 65536


def first_token_latency(h: Harness) -> LatencyResult:
    p = h.profile
    group = h.group("fast")
    try:
        per = h.interleaved(
            "first_token_latency",
            p.latency_rounds,
            group,
            [
                "--query",
                words(p.latency_tokens, FAST_REPEAT),
                "--concurrency",
                "1",
                "--requests",
                str(p.latency_requests),
                "--warmup",
                "5",
                "--max-s",
                "120",
            ],
        )
    finally:
        h.release(group)
    targets: dict[str, LatencyTarget] = {}
    for target, results in per.items():
        samples = [v for r in results for v in r.first_token_ms_all]
        targets[target] = LatencyTarget(
            first_token_ms=Summary.of(samples),
            round_p50s=[r.first_token_ms.p50 for r in results],
            completed=sum(r.completed for r in results),
            errors=merge_counts(r.errors for r in results),
            loadgen_cpu_utilisation=statistics.median(r.cpu_utilisation or 0 for r in results),
            samples_ms=samples,
        )
    out = LatencyResult(1, p.latency_tokens, p.latency_rounds * p.latency_requests, targets)
    if "direct" in targets:
        direct = targets["direct"].first_token_ms
        for target in h.http_targets:
            out.added_p50_ms[target] = sub(targets[target].first_token_ms.p50, direct.p50)
            out.added_p99_ms[target] = sub(targets[target].first_token_ms.p99, direct.p99)
    return out


def throughput(h: Harness) -> ThroughputResult:
    p = h.profile
    group = h.group("fast")
    requests = p.throughput_clients * p.throughput_streams_per_client
    try:
        per = h.interleaved(
            "throughput",
            p.throughput_rounds,
            group,
            [
                "--query",
                words(p.throughput_tokens, FAST_REPEAT),
                "--concurrency",
                str(p.throughput_clients),
                "--requests",
                str(requests),
                "--max-s",
                "120",
            ],
        )
    finally:
        h.release(group)
    targets: dict[str, ThroughputTarget] = {}
    for target, results in per.items():
        row = ThroughputTarget(
            tokens_per_s=statistics.median(r.tokens_per_s or 0 for r in results),
            tokens_per_s_rounds=[r.tokens_per_s for r in results],
            tokens=sum(r.tokens for r in results),
            completed=sum(r.completed for r in results),
            errors=merge_counts(r.errors for r in results),
            stub_cpu_s_per_1k_tokens=per_1k_tokens(results, [r.stub_cpu_s for r in results]),
            loadgen_cpu_s_per_1k_tokens=per_1k_tokens(results, [r.cpu_s for r in results]),
            loadgen_cpu_utilisation=statistics.median(r.cpu_utilisation or 0 for r in results),
            first_token_ms_p50=statistics.median(r.first_token_ms.p50 or 0 for r in results),
        )
        if target != "direct":
            row.server_cpu_s_per_1k_tokens = per_1k_tokens(results, [r.server_cpu_s for r in results])
            row.server_cpu_utilisation = sum(r.server_cpu_s or 0 for r in results) / max(
                1e-9, sum(r.wall_s for r in results)
            )
        targets[target] = row
    return ThroughputResult(p.throughput_clients, p.throughput_tokens, requests, p.throughput_rounds, targets)


def paced_concurrency(h: Harness) -> PacedResult:
    p = h.profile
    group = h.group("paced")
    levels: dict[str, list[PacedLevel]] = {t: [] for t in h.targets}
    stream_s = p.paced_tokens * p.pacing_ms / 1000
    try:
        for level in p.paced_levels:
            for target in h.targets:
                log(f"paced_concurrency {level} streams: {target}")
                ramp = min(2.0, level / 1000)
                r = h.run(
                    target,
                    group,
                    "--query",
                    words(p.paced_tokens),
                    "--concurrency",
                    str(level),
                    "--ramp-s",
                    str(ramp),
                    "--max-s",
                    str(stream_s * 4 + ramp + 20),
                    timeout=stream_s * 4 + ramp + 60,
                )
                stub_share = r.stub_cpu_s / r.wall_s
                levels[target].append(
                    PacedLevel(
                        streams=level,
                        completed=r.completed,
                        errors=r.errors,
                        error_examples=r.error_examples,
                        gap_ms=r.gap_ms,
                        first_token_ms=r.first_token_ms,
                        loadgen_cpu_utilisation=r.cpu_utilisation,
                        server_cpu_utilisation=None if r.server_cpu_s is None else r.server_cpu_s / r.wall_s,
                        stub_cpu_utilisation=stub_share,
                        # The stub is Python too; pinned to one core it cannot pace more than about
                        # 1 / (its CPU per token) tokens/s, and then every target misses the pace.
                        stub_saturated=h.cores.pinned and stub_share > 0.85,
                    )
                )
                h.settle()  # let the previous level's sockets and streams wind down
    finally:
        h.release(group)
    limit = 2 * p.pacing_ms
    targets: dict[str, PacedTarget] = {}
    for target, rows in levels.items():
        failing = [row.streams for row in rows if not row.holds(limit)]
        first_fail = min(failing) if failing else None
        # The highest level before the first failing one holds the pace.
        held = max(
            (row.streams for row in rows if row.holds(limit) and (first_fail is None or row.streams < first_fail)),
            default=0,
        )
        targets[target] = PacedTarget(rows, first_fail, held, first_fail is None)
    return PacedResult(p.pacing_ms, p.paced_tokens, list(p.paced_levels), limit, targets)


def idle_connections(h: Harness) -> IdleResult:
    p = h.profile
    group = h.group("idle")
    targets: dict[str, IdleTarget] = {}
    try:
        for target in h.http_targets:
            server = group.servers[target]
            log(f"idle_connections {p.idle_streams} streams: {target}")
            h.warm_up(
                target, group, "--query", "idle", "--concurrency", "50", "--hold-s", "0.5", "--max-s", "20", timeout=40
            )
            h.settle()
            before = server.rss()
            lg = h.loadgen(
                target,
                group,
                "--query",
                "idle",
                "--concurrency",
                str(p.idle_streams),
                "--ramp-s",
                str(min(2.0, p.idle_streams / 1000)),
                "--hold-s",
                str(p.idle_hold_s),
                "--max-s",
                str(p.idle_hold_s + 60),
            )
            ready = lg.event("ready", 90)
            time.sleep(min(p.idle_hold_s / 2, 2 * p.heartbeat_s))  # a couple of heartbeats go out
            during = server.rss()
            result = lg.result(p.idle_hold_s + 90)
            h.settle()
            after = server.rss()
            targets[target] = IdleTarget(
                open_streams=int(ready["open"]),
                rss_per_stream_kib=(during - before) / max(1, int(ready["open"])) / 1024,
                rss_before_mib=before / 2**20,
                rss_during_mib=during / 2**20,
                rss_after_close_mib=after / 2**20,
                heartbeats_received=int(result["heartbeats"]),
                errors=dict(result["errors"]),
            )
        if "direct" in h.targets and not h.quick:
            targets["direct"] = _direct_idle_rss(h, group)
    finally:
        h.release(group)
    return IdleResult(p.idle_streams, p.heartbeat_s, IDLE_FIRST_TOKEN_DELAY_MS, targets)


def _direct_idle_rss(h: Harness, group: Group) -> IdleTarget:
    """No middle process: the gRPC client's own RSS, by difference of two stream counts, shows how
    much of a bridge's per-stream memory is grpc.aio's own cost."""
    p = h.profile
    log(f"idle_connections {p.idle_streams} streams: direct (gRPC client RSS by difference)")
    small = max(1, p.idle_streams // 20)
    rss: dict[int, int] = {}
    for n in (small, p.idle_streams):
        lg = h.loadgen(
            "direct",
            group,
            "--query",
            "idle",
            "--concurrency",
            str(n),
            "--hold-s",
            str(min(1.0, p.idle_hold_s)),
            "--max-s",
            "60",
        )
        lg.event("ready", 90)
        time.sleep(min(0.5, p.idle_hold_s / 2))
        rss[n] = lg.rss()
        lg.result(90)
    per_stream = None
    if p.idle_streams > small:
        per_stream = (rss[p.idle_streams] - rss[small]) / (p.idle_streams - small) / 1024
    return IdleTarget(
        open_streams=p.idle_streams,
        rss_per_stream_kib=per_stream,
        method=f"client RSS with {p.idle_streams} streams minus with {small}, per stream",
    )


def cancellation(h: Harness) -> CancelResult:
    p = h.profile
    group = h.group("paced")
    targets: dict[str, CancelTarget] = {}
    try:
        for target in h.targets:
            log(f"cancellation {p.cancel_streams} streams: {target}")
            r = h.run(
                target,
                group,
                "--query",
                words(p.paced_tokens),
                "--concurrency",
                str(p.cancel_streams),
                "--ramp-s",
                str(min(1.0, p.cancel_streams / 1000)),
                "--close-after-tokens",
                str(p.cancel_after_tokens),
                "--max-s",
                "60",
                timeout=120,
            )
            closed = {c.request_id: c.closed_at for c in r.closed if c.request_id and c.closed_at}
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # bounded: wait for the stub's stream_end lines
                if all(rid in group.stub.ends() for rid in closed):
                    break
                time.sleep(0.05)
            ends = group.stub.ends()
            delays = [
                (ends[rid]["ended_at"] - at) * 1000
                for rid, at in closed.items()
                if rid in ends and ends[rid]["outcome"] == "cancelled"
            ]
            outcomes: dict[str, int] = {}
            for rid in closed:
                key = ends[rid]["outcome"] if rid in ends else "no stream_end line"
                outcomes[key] = outcomes.get(key, 0) + 1
            targets[target] = CancelTarget(
                closed=len(closed),
                no_request_id=sum(1 for c in r.closed if not c.request_id),
                outcomes=outcomes,
                close_to_cancelled_ms=Summary.of(delays),
                samples_ms=delays,
                errors=r.errors,
            )
            h.settle()
    finally:
        h.release(group)
    return CancelResult(p.cancel_streams, p.cancel_after_tokens, p.pacing_ms, p.paced_tokens, targets)


def slow_reader(h: Harness) -> SlowReaderResult:
    p = h.profile
    slow_query = words(p.slow_tokens, FAST_REPEAT)  # 2 000 words x 50 = 100 000 tokens; 8 000 bytes
    rcvbuf = str(SLOW_READER_RCVBUF)
    group = h.group("fast")
    targets: dict[str, SlowReaderTarget] = {}
    try:
        for target in h.http_targets:
            server = group.servers[target]
            log(f"slow_reader {p.slow_stall_s}s stall: {target}")
            h.warm_up(
                target,
                group,
                "--query",
                slow_query,
                "--stall-after-tokens",
                "2000",
                "--stall-s",
                "0.2",
                "--rcvbuf",
                rcvbuf,
                "--max-s",
                "30",
                timeout=60,
            )
            h.settle()
            before = server.rss()
            ends_before = set(group.stub.ends())
            with Sampler(server) as sampler:
                lg = h.loadgen(
                    target,
                    group,
                    "--query",
                    slow_query,
                    "--stall-after-tokens",
                    str(p.slow_after_tokens),
                    "--stall-s",
                    str(p.slow_stall_s),
                    "--rcvbuf",
                    rcvbuf,
                    "--max-s",
                    str(p.slow_stall_s + 60),
                )
                stalled_at = float(lg.event("stalling", 60)["at"])
                result = lg.result(p.slow_stall_s + 90)
            peak = max((rss for t, rss in sampler.samples if t >= stalled_at), default=before)
            h.settle()
            ends = [v for k, v in group.stub.ends().items() if k not in ends_before]
            targets[target] = SlowReaderTarget(
                rss_before_mib=before / 2**20,
                rss_peak_during_stall_mib=peak / 2**20,
                rss_growth_mib=(peak - before) / 2**20,
                client_tokens_read=int(result["tokens"]),
                upstream_tokens_sent=[int(e["tokens_sent"]) for e in ends],
                upstream_outcomes=[str(e["outcome"]) for e in ends],
                rss_series_mib=[
                    (round(t - stalled_at, 3), round(rss / 2**20, 3))
                    for t, rss in sampler.samples[:: max(1, len(sampler.samples) // 400)]
                ],
            )
    finally:
        h.release(group)
    return SlowReaderResult(p.slow_tokens, p.slow_stall_s, p.slow_after_tokens, SLOW_READER_RCVBUF, targets)


SCENARIOS: dict[str, Callable[[Harness], ScenarioResult]] = {
    "first_token_latency": first_token_latency,
    "throughput": throughput,
    "paced_concurrency": paced_concurrency,
    "idle_connections": idle_connections,
    "cancellation": cancellation,
    "slow_reader": slow_reader,
}

# Which process group each scenario runs against (quick runs start them all up front).
GROUP_OF = {
    "first_token_latency": "fast",
    "throughput": "fast",
    "paced_concurrency": "paced",
    "cancellation": "paced",
    "idle_connections": "idle",
    "slow_reader": "fast",
}
