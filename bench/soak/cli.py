"""``python -m bench.soak``: options, the run (warm-up, baseline, traffic, settle, SIGTERM) and the summary."""

from __future__ import annotations

import argparse
import asyncio
import csv
import gc
import json
import os
import signal
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

from bench import soak as package
from bench.loadgen import raise_fd_limit
from bench.procs import HttpServer, StubProc, start_bridge, start_traced_bridge
from bench.soak.checks import check_audit, check_streams, check_stub, cpu_s, expected_outcome, poll, stub_end_lines
from bench.soak.memory import chart, memory_split_mib, memtrace_growth, rss_slope
from bench.soak.traffic import STATS_PATH, Options, Soak
from bzb_shared.childproc import ROOT

MAX_FAILURES_KEPT = 50


def parse_args(argv: Sequence[str] | None) -> Options:
    p = argparse.ArgumentParser(prog="bench.soak", description=(package.__doc__ or "").split("\n\n")[0])
    p.add_argument("--duration", type=float, default=60.0, help="seconds of mixed traffic")
    p.add_argument("--concurrency", type=int, default=1000, help="logical streams kept running")
    p.add_argument(
        "--token-delay-ms",
        type=float,
        default=None,
        help="stub pacing (default: 20, slowed for high concurrency so 2 cores keep up)",
    )
    p.add_argument("--grace-s", type=float, default=5.0, help="RESUME_GRACE_S of the bridge")
    p.add_argument("--hammer-users", type=int, default=3, help="users that exceed the rate limit")
    p.add_argument("--warmup-s", type=float, default=None, help="warm-up before the baseline")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--out", default=str(ROOT / "bench" / "results" / "soak.json"), help="summary file (a directory gets soak.json)"
    )
    p.add_argument("--rss-margin-mib", type=float, default=None, help="allowed RSS growth over the baseline")
    p.add_argument("--fd-margin", type=int, default=8, help="allowed open-fd growth over the baseline")
    p.add_argument(
        "--chart",
        default=None,
        metavar="PNG",
        help="also draw the RSS timeline (RSS over time and over streams started) to this file",
    )
    p.add_argument(
        "--bridge-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra bridge setting, repeatable (elimination runs: TELEMETRY off, another AUDIT_DB...)",
    )
    p.add_argument(
        "--memtrace-at",
        default="",
        metavar="MIN,MIN",
        help="diagnosis: run the bridge under bench.lab.memtrace, probe its memory at these minutes of "
        "traffic (pymalloc arenas; tracemalloc with --memtrace-frames) and report the growth between the last two",
    )
    p.add_argument(
        "--memtrace-frames",
        type=int,
        default=0,
        help="also trace Python allocations with this many frames (~half the throughput); 0: allocator stats only",
    )
    a = p.parse_args(argv)
    try:
        memtrace_at = tuple(sorted(float(m) * 60 for m in a.memtrace_at.split(",") if m.strip()))
    except ValueError:
        p.error(f"--memtrace-at wants minutes like 6,11, got {a.memtrace_at!r}")
    extra: dict[str, str] = {}
    for item in a.bridge_env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            p.error(f"--bridge-env wants NAME=VALUE, got {item!r}")
        extra[name] = value
    out = Path(a.out)
    if out.suffix != ".json":
        out = out / "soak.json"
    concurrency = max(1, min(a.concurrency, 5000))
    # ~5 000 tokens/s is what the stub, the bridge and this client share well on 2 cores.
    delay = a.token_delay_ms if a.token_delay_ms is not None else max(20.0, concurrency / 5.0)
    warmup = a.warmup_s if a.warmup_s is not None else min(5.0, max(3.0, a.duration / 6))
    return Options(
        duration=max(1.0, min(a.duration, 3600.0)),
        concurrency=concurrency,
        token_delay_ms=delay,
        grace_s=a.grace_s,
        hammer_users=max(0, a.hammer_users),
        warmup_s=warmup,
        seed=a.seed,
        out=out,
        # Bounded caches still fill after the warm-up (stats window buckets, SQLite page cache,
        # allocator arenas): a flat allowance plus a little per concurrent stream.
        rss_margin_mib=a.rss_margin_mib if a.rss_margin_mib is not None else 16.0 + concurrency * 0.02,
        fd_margin=a.fd_margin,
        # A normal user opens <= 10 s / MIN_OPEN_GAP_S = 40 streams per 10 s; hammers try ~200.
        rate_limit=60,
        rate_window_s=10,
        bridge_env=extra,
        memtrace_at_s=memtrace_at,
        memtrace_frames=max(0, a.memtrace_frames),
        chart=Path(a.chart) if a.chart else None,
    )


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    fd_limit = raise_fd_limit()  # the children inherit it
    started_at = time.monotonic()
    failures: list[str] = []
    summary: dict[str, Any] = {
        "concurrency": opts.concurrency,
        "duration_s": opts.duration,
        "token_delay_ms": opts.token_delay_ms,
        "resume_grace_s": opts.grace_s,
        "rate_limit": f"{opts.rate_limit} per {opts.rate_window_s} seconds",
        "hammer_users": opts.hammer_users,
        "fd_limit": fd_limit,
        "seed": opts.seed,
        "bridge_env": opts.bridge_env,
    }
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        audit_db = Path(tmp) / "audit.sqlite3"
        stub = StubProc(
            ["--mode", "echo", "--echo-delimiter", ",", "--token-delay-ms", f"{opts.token_delay_ms:g}"], None
        )
        bridge: HttpServer | None = None
        try:
            env = {
                "RESUME_GRACE_S": f"{opts.grace_s:g}",
                "AUDIT_DB": str(audit_db),
                "RATE_LIMIT": f"{opts.rate_limit} per {opts.rate_window_s} seconds",
                "TRUSTED_PROXIES": "127.0.0.1/32",
                "MAX_STREAMS_PER_USER": "1000000",
                "MAX_STREAMS_TOTAL": "1000000",
                # A soak user holds far more streams than a real one may (the line above), so its
                # resumes and stops would outrun a budget sized for MAX_STREAMS_PER_USER streams.
                "CONTROL_RATE_LIMIT": "1000000/minute",
                "LOG_LEVEL": "WARNING",
                **opts.bridge_env,
            }
            probes = Path(tmp) / "memtrace"
            if opts.memtrace_at_s:
                bridge = start_traced_bridge(stub.target, probes, opts.memtrace_frames, Path(tmp), **env)
            else:
                bridge = start_bridge(stub.target, None, Path(tmp), **env)
            run(opts, stub, bridge, audit_db, summary, failures)
            if opts.memtrace_at_s:
                summary["memtrace"] = memtrace_growth(probes, opts.memtrace_at_s, failures)
        finally:
            if bridge is not None:
                bridge.stop(30)
            stub.stop()
    summary["wall_s"] = round(time.monotonic() - started_at, 1)
    summary["failures"] = failures[:MAX_FAILURES_KEPT]
    summary["failure_count"] = len(failures)
    summary["ok"] = not failures
    if opts.chart is not None and "resources" in summary:
        chart(summary, opts.chart)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    if "resources" in summary:
        # The raw samples go beside the summary, not into it: the summary is what gets read and
        # committed, the samples are what the chart was drawn from.
        write_timeline(summary["resources"].pop("timeline"), timeline_path(opts.out))
    text = json.dumps(summary, indent=2)
    print(text, flush=True)
    opts.out.write_text(text + "\n")
    return 0 if not failures else 1


TIMELINE_COLUMNS = ("seconds", "open_fds", "rss_mib", "streams_started", "anonymous_mib", "file_backed_mib")


def timeline_path(summary_path: Path) -> Path:
    """Where the RSS samples of the run summarised in ``summary_path`` are written (CSV)."""
    return summary_path.with_name(summary_path.stem + ".timeline.csv")


def write_timeline(rows: Sequence[Sequence[float]], path: Path) -> None:
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(TIMELINE_COLUMNS)
        writer.writerows(rows)


def run(
    opts: Options, stub: StubProc, bridge: HttpServer, audit_db: Path, summary: dict[str, Any], failures: list[str]
) -> None:
    import uvloop

    host, port = "127.0.0.1", int(bridge.url.rsplit(":", 1)[1])
    soak = Soak(opts, host, port)
    ps = psutil.Process(bridge.proc.pid)

    def resources() -> tuple[int, int]:
        return int(ps.num_fds()), int(ps.memory_info().rss)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:

        def stats() -> dict[str, Any]:
            return dict(runner.run(soak.get_json(STATS_PATH)))

        def idle(sessions: bool = True) -> bool:
            snap = stats()
            return bool(
                snap["open_streams"] == 0
                and snap["open_connections_by_cap"] == 0
                and (not sessions or snap["sessions_held"] == 0)
            )

        settle_s = opts.grace_s + 30
        # Warm-up with the same mix at full concurrency, so the baseline already has the pools and
        # arenas a run needs. Sessions kept for the grace window may still be held: a conservative
        # baseline (the final figures are taken once they are gone).
        runner.run(soak.phase(opts.warmup_s, opts.concurrency, hammers=opts.hammer_users))
        warm = len(soak.streams)
        if not poll(lambda: idle(sessions=False), settle_s):
            failures.append(f"after the warm-up the bridge is not idle: {stats()}")
        time.sleep(0.5)
        fds0, rss0 = resources()
        summary["baseline"] = {"fds": fds0, "rss_mib": round(rss0 / 2**20, 1), "warmup_streams": warm}

        t0 = time.monotonic()
        peak = {"fds": 0, "rss": 0}
        cpu0 = {"bridge": cpu_s(ps), "stub": cpu_s(stub.ps), "client": cpu_s(psutil.Process())}

        # [seconds, open fds, RSS MiB, streams started since t0, anonymous MiB, file-backed MiB]
        # every 5 s: the slope per stream started is what tells a leak from a busy box (a loaded
        # host just starts fewer streams).
        timeline: list[list[float]] = []
        opened0 = soak.opened

        snapshot_times = list(opts.memtrace_at_s)

        async def sample() -> None:
            for i in range(100_000):
                if snapshot_times and time.monotonic() - t0 >= snapshot_times[0]:
                    snapshot_times.pop(0)
                    os.kill(ps.pid, signal.SIGUSR2)  # bench.lab.memtrace dumps a snapshot
                fds, rss = resources()
                peak["fds"], peak["rss"] = max(peak["fds"], fds), max(peak["rss"], rss)
                if i % 60 == 0:
                    # The client keeps every stream's record (tokens included) for the final
                    # accounting: millions of objects, which a full collection scans. In a long
                    # run such a collection stalls this client's loop for seconds, so planned
                    # reconnects would arrive after the resume window (clusters of STREAM_EXPIRED
                    # charged to the bridge). Frozen objects are not scanned again.
                    gc.freeze()
                if i % 10 == 0:
                    resident, anonymous, file_backed = memory_split_mib(ps.pid)
                    timeline.append(
                        [
                            round(time.monotonic() - t0, 1),
                            fds,
                            resident,
                            soak.opened - opened0,
                            anonymous,
                            file_backed,
                        ]
                    )
                await asyncio.sleep(0.5)

        async def main_phase() -> None:
            sampler = asyncio.ensure_future(sample())
            try:
                await soak.phase(opts.duration, opts.concurrency, hammers=opts.hammer_users)
            finally:
                sampler.cancel()

        runner.run(main_phase())
        traffic_s = time.monotonic() - t0
        cpu = {"bridge": cpu_s(ps), "stub": cpu_s(stub.ps), "client": cpu_s(psutil.Process())}
        summary["cpu_s"] = {k: round(cpu[k] - cpu0[k], 1) for k in cpu}
        summary["cpu_s"]["load_average_1m"] = round(os.getloadavg()[0], 2)

        if not poll(idle, settle_s):
            failures.append(f"after the run the bridge is not idle: {stats()}")
        final_stats = stats()
        back = poll(
            lambda: resources()[0] <= fds0 + opts.fd_margin and resources()[1] <= rss0 + opts.rss_margin_mib * 2**20,
            15,
            0.5,
        )
        fds1, rss1 = resources()
        if not back:
            failures.append(
                f"resources did not return to baseline: fds {fds0} -> {fds1} (margin {opts.fd_margin}), "
                f"RSS {rss0 / 2**20:.1f} -> {rss1 / 2**20:.1f} MiB (margin {opts.rss_margin_mib:g})"
            )
    # Every stream the stub served has ended by now (the bridge is idle); give the pipe a moment.
    n_started = sum(1 for s in soak.streams if s.started)
    poll(lambda: len(stub_end_lines(stub)) >= n_started, 10)

    bridge.signal(signal.SIGTERM)
    try:
        code: int | None = bridge.wait(60)
    except subprocess.TimeoutExpired:
        code = None
        bridge.kill()
    if code != 0:
        failures.append(f"bridge exited with {code} after SIGTERM")

    check_streams(soak.streams, failures)
    stub_report = check_stub(soak.streams, stub_end_lines(stub), failures)
    audit_report = check_audit(soak.streams, soak.rejected_429, audit_db, failures)
    if soak.retry_after_missing:
        failures.append(f"{soak.retry_after_missing} 429 answers without Retry-After")
    if soak.other_rejections:
        failures.append(f"unexpected statuses on open: {dict(soak.other_rejections)}")

    # Every resume that was served (not answered STREAM_EXPIRED) is one reconnection for the bridge.
    served = sum(s.resumes - s.expired for s in soak.streams)
    if final_stats.get("reconnections") != served:
        failures.append(
            f"stream-stats counts {final_stats.get('reconnections')} reconnections, the soak resumed {served} times"
        )
    main_streams = soak.streams[warm:]
    started = [s for s in main_streams if s.started]
    plans = Counter(s.plan.kind for s in started)
    summary.update(
        {
            "traffic_s": round(traffic_s, 1),
            "streams": {
                "started": len(started),
                "warmup": warm,
                "by_plan": dict(plans),
                "completed": sum(s.done for s in started),
                "cancelled": sum(expected_outcome(s) == "cancelled" for s in started),
                "failed": sum(expected_outcome(s) == "error" for s in started),
                "deleted": sum(s.deleted for s in started),
                "abandoned": plans["abandon"],
            },
            "tokens": sum(len(s.tokens) for s in main_streams),
            "tokens_per_s": round(sum(len(s.tokens) for s in main_streams) / max(traffic_s, 0.001)),
            "connections": sum(s.connections for s in main_streams),
            "resumes": sum(s.resumes for s in main_streams),
            "expired": sum(s.expired for s in main_streams),
            "rate_limited_429": soak.rejected_429,
            "resources": {
                "fds_before": fds0,
                "fds_peak": peak["fds"],
                "fds_after": fds1,
                "rss_before_mib": round(rss0 / 2**20, 1),
                "rss_peak_mib": round(peak["rss"] / 2**20, 1),
                "rss_after_mib": round(rss1 / 2**20, 1),
                "returned": back,
                "timeline": timeline,
            },
            "rss_slope": rss_slope(timeline, opts.duration),
            "stream_stats_after": {
                k: final_stats.get(k)
                for k in (
                    "open_streams",
                    "sessions_held",
                    "open_connections_by_cap",
                    "streams_opened",
                    "outcomes",
                    "reconnections",
                )
            },
            "stub": stub_report,
            "audit": audit_report,
            "bridge_stderr_tail": bridge.stderr_lines[-5:],
        }
    )
