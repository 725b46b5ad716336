"""The workers scenario: paced streams held within the targets at 1 and 2 workers, interleaved.

    python -m bench.workers [--levels 100,150,...] [--rounds 3] [--pacing-ms 25] [--out FILE]

One stub (echo, paced), one redis-server, and two bridges started side by side with the same
settings (Redis-backed limits and caps, limits lifted, no resume): ``WORKERS=1`` and ``WORKERS=2``.
At each level of concurrent streams, a fresh load generator runs the level against one bridge,
then the other (the order alternates by level and round), so a noisy phase of the shared host
hits both. A level is *held* when every stream completed without error, first-token p99 < 100 ms
and inter-token p99 < 50 ms (the deployment guide's targets, ORIGINAL-DESIGN); the streams held
are the highest level before the first one that is not. Nothing is pinned: two workers need both
cores, which the stub, Redis and the load generator share. With ``--cores-per-worker C`` each
worker runs under a CPU budget of C cores (bench/cpuquota.py) and the stub and load generator keep
the rest: a run that measures how streams held scale with the CPU the workers are given, which a
host with no cores to spare beyond the load's own cannot show otherwise.

Per run it keeps tokens/s, each worker's CPU (psutil, all threads) and RSS, the stub's and the load
generator's CPU; the report gives the ratio of streams held (2 workers / 1) per round, CPU
microseconds per token per worker and RSS per worker.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.cpuquota import CpuQuota, QuotaUnavailable
from bench.procs import HttpServer, Loadgen, RedisProc, StubProc, free_port, start_bridge
from bench.workload import log, words

FIRST_TOKEN_TARGET_MS = 100.0
GAP_TARGET_MS = 50.0
OPENS_PER_S = 100
"""New streams per second while a level ramps up (``--opens-per-s``): arrivals spread as real
users', not one burst."""


@dataclass(slots=True)
class Run:
    workers: int
    streams: int
    completed: int
    errors: dict[str, int]
    tokens: int
    wall_s: float
    tokens_per_s: float
    first_token_p99_ms: float | None
    gap_p99_ms: float | None
    gap_p50_ms: float | None
    worker_cpu_s: list[float]
    worker_rss_mib: list[float]
    stub_cpu_s: float
    loadgen_cpu_s: float
    throttled_s: float

    @property
    def held(self) -> bool:
        return (
            self.completed == self.streams
            and not self.errors
            and self.first_token_p99_ms is not None
            and self.first_token_p99_ms < FIRST_TOKEN_TARGET_MS
            and self.gap_p99_ms is not None
            and self.gap_p99_ms < GAP_TARGET_MS
        )

    @property
    def cpu_us_per_token(self) -> float | None:
        return sum(self.worker_cpu_s) / self.tokens * 1e6 if self.tokens else None


@dataclass(slots=True)
class Round:
    runs: list[Run] = field(default_factory=list)

    def held(self, workers: int) -> int:
        """The highest level held before the first level that is not."""
        best = 0
        for run in sorted((r for r in self.runs if r.workers == workers), key=lambda r: r.streams):
            if not run.held:
                break
            best = run.streams
        return best


def serving_processes(server: HttpServer) -> list[psutil.Process]:
    """The processes that serve: the workers of a supervisor, or the one bridge process."""
    children = server.ps.children()
    return children or [server.ps]


def cpu_s(process: psutil.Process) -> float:
    t = process.cpu_times()
    return float(t.user + t.system)


def run_level(
    server: HttpServer,
    workers: int,
    stub: StubProc,
    streams: int,
    tokens: int,
    pacing_ms: int,
    quotas: list[CpuQuota],
    opens_per_s: float = OPENS_PER_S,
) -> Run:
    stream_s = tokens * pacing_ms / 1000
    ramp = streams / opens_per_s
    procs = serving_processes(server)
    before = [cpu_s(p) for p in procs]
    stub_before = stub.cpu_s()
    throttled_before = sum(q.throttled_s() for q in quotas)
    loadgen = Loadgen(
        [
            "sse",
            "--url",
            server.stream_url,
            "--query",
            words(tokens),
            "--concurrency",
            str(streams),
            "--ramp-s",
            str(ramp),
            "--max-s",
            str(stream_s * 4 + ramp + 20),
        ],
        None,
    )
    result = loadgen.result(stream_s * 4 + ramp + 60)
    after = [cpu_s(p) for p in procs]
    return Run(
        workers=workers,
        streams=streams,
        completed=int(result["completed"]),
        errors=dict(result["errors"]),
        tokens=int(result["tokens"]),
        wall_s=float(result["wall_s"]),
        tokens_per_s=float(result["tokens_per_s"] or 0),
        first_token_p99_ms=result["first_token_ms"]["p99"],
        gap_p99_ms=result["gap_ms"]["p99"],
        gap_p50_ms=result["gap_ms"]["p50"],
        worker_cpu_s=[round(b - a, 3) for a, b in zip(before, after, strict=True)],
        worker_rss_mib=[round(p.memory_info().rss / 2**20, 1) for p in procs],
        stub_cpu_s=round(stub.cpu_s() - stub_before, 3),
        loadgen_cpu_s=float(result["cpu_s"]),
        throttled_s=round(sum(q.throttled_s() for q in quotas) - throttled_before, 3),
    )


def summary(rounds: list[Round]) -> dict[str, Any]:
    ratios = []
    for r in rounds:
        one, two = r.held(1), r.held(2)
        ratios.append(two / one if one else None)
    at_held: dict[int, list[Run]] = {1: [], 2: []}
    for r in rounds:
        for workers in (1, 2):
            held = r.held(workers)
            at_held[workers] += [run for run in r.runs if run.workers == workers and run.streams == held]
    out: dict[str, Any] = {
        "held": {str(w): [r.held(w) for r in rounds] for w in (1, 2)},
        "ratio": ratios,
        "ratio_median": statistics.median([x for x in ratios if x is not None]) if any(ratios) else None,
    }
    for workers, runs in at_held.items():
        if not runs:
            continue
        out[f"at_held_{workers}"] = {
            "tokens_per_s": [round(run.tokens_per_s) for run in runs],
            "cpu_us_per_token": [round(run.cpu_us_per_token or 0, 1) for run in runs],
            "worker_cpu_utilisation": [[round(c / run.wall_s, 2) for c in run.worker_cpu_s] for run in runs],
            "worker_rss_mib": [run.worker_rss_mib for run in runs],
            "stub_cpu_utilisation": [round(run.stub_cpu_s / run.wall_s, 2) for run in runs],
            "loadgen_cpu_utilisation": [round(run.loadgen_cpu_s / run.wall_s, 2) for run in runs],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.workers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="50,100,150,200,250,300,350,400,500")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pacing-ms", type=int, default=25)
    parser.add_argument("--tokens", type=int, default=200, help="tokens per stream")
    parser.add_argument(
        "--opens-per-s", type=float, default=OPENS_PER_S, help="new streams a second while a level ramps"
    )
    parser.add_argument(
        "--cores-per-worker",
        type=float,
        default=None,
        help="hold each worker to this many cores (a cgroup CPU quota; needs root); default: no budget",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/workers.json"))
    args = parser.parse_args(argv)
    # SIGTERM (a timeout, Ctrl-C in a wrapper) must still run the finally below: no orphans left.
    signal.signal(signal.SIGTERM, lambda sig, frame: sys.exit(128 + sig))
    levels = [int(x) for x in args.levels.split(",")]
    try:
        report = measure(args, levels)
    except QuotaUnavailable as exc:
        print(f"bench.workers: {exc}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["summary"], indent=1))
    return 0


def measure(args: argparse.Namespace, levels: list[int]) -> dict[str, Any]:
    """Run every round; the report (settings, load average, summary and every run)."""
    rounds: list[Round] = []
    with tempfile.TemporaryDirectory(prefix="bzb-bench-workers-") as workdir:
        redis = RedisProc(free_port())
        stub = StubProc(["--mode", "echo", "--token-delay-ms", str(args.pacing_ms)], None)
        env = {"RATE_LIMIT_STORAGE": redis.url, "RESUME_GRACE_S": "0"}
        servers = {w: start_bridge(stub.target, None, Path(workdir), WORKERS=str(w), **env) for w in (1, 2)}
        quotas: dict[int, list[CpuQuota]] = {1: [], 2: []}
        started = time.time()
        load_start = psutil.getloadavg()
        try:
            if args.cores_per_worker is not None:
                for w, server in servers.items():
                    for slot, process in enumerate(serving_processes(server)):
                        quotas[w].append(CpuQuota(f"w{w}-{slot}", args.cores_per_worker))
                        quotas[w][-1].add(process.pid)
            for index in range(args.rounds):
                current = Round()
                rounds.append(current)
                for position, level in enumerate(levels):
                    order = (1, 2) if (index + position) % 2 == 0 else (2, 1)
                    for workers in order:
                        if any(r.workers == workers and not r.held for r in current.runs):
                            continue  # past this target's knee in this round
                        run = run_level(
                            servers[workers],
                            workers,
                            stub,
                            level,
                            args.tokens,
                            args.pacing_ms,
                            quotas[workers],
                            args.opens_per_s,
                        )
                        current.runs.append(run)
                        log(
                            f"round {index + 1} {level} streams, {workers} worker(s): held={run.held} "
                            f"first p99={run.first_token_p99_ms} gap p99={run.gap_p99_ms} "
                            f"tok/s={run.tokens_per_s:.0f} cpu us/token={run.cpu_us_per_token}"
                        )
                        time.sleep(1.0)  # let the previous level's sockets and streams wind down
        finally:
            for server in servers.values():
                server.stop(60)
            stub.stop()
            redis.stop()
            for quota in (q for qs in quotas.values() for q in qs):
                quota.close()
    return {
        "started": started,
        "load_average_start": load_start,
        "load_average_end": psutil.getloadavg(),
        "pacing_ms": args.pacing_ms,
        "cores_per_worker": args.cores_per_worker,
        "tokens_per_stream": args.tokens,
        "opens_per_s": args.opens_per_s,
        "levels": levels,
        "summary": summary(rounds),
        "rounds": [[asdict(run) | {"held": run.held} for run in r.runs] for r in rounds],
    }


if __name__ == "__main__":
    raise SystemExit(main())
