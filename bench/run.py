"""``make bench``: bali-zero-bridge against direct gRPC and the obvious reference bridge.

Starts the stub(s), our bridge and the reference peer as separate processes on free loopback
ports, drives them with ``bench.loadgen`` (its own process, uvloop), and writes
``bench/results/report.json`` and ``bench/results/chart.png``, then prints a markdown table.

    python -m bench.run                 # the full run (several minutes)
    python -m bench.run --quick         # a ~10 s smoke run with tiny numbers (CI)
    python -m bench.run --only throughput,cancellation --pin off --out /tmp/bench

Scenarios (targets in brackets are what the README promises):
  first_token_latency  1 client, no delay, 50 tokens, >= 500 requests per target, interleaved
                       rounds; added = target - direct gRPC   [bridge added <= 0.5 x peer added]
  throughput           16 clients, no delay, 1 000-token streams; tokens/s, server CPU s per
                       1 000 tokens                            [bridge >= 0.7 x direct gRPC]
  paced_concurrency    50 ms pacing, 200 tokens, 100/250/500/750/1 000/2 000 streams; the knee is
                       the first level whose p99 inter-token gap > 2 x pacing
                                                               [>= 0.8 x direct, >= 1.5 x peer]
  idle_connections     streams waiting on a slow first token, 1 s heartbeats; RSS per stream
                                                               [<= 30 KiB]
  cancellation         500 streams closed mid-way; close -> stub's `cancelled` ended_at
                                                               [p99 <= 20 ms]
  slow_reader          one reader stops reading, upstream has 100 000 tokens; RSS growth
                                                               [<= 2 MiB]
Not timed tests: nothing here fails on a number; the report says which targets were met.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.loadgen import raise_fd_limit, summarize
from bench.procs import (
    HttpServer,
    Loadgen,
    Sampler,
    StubProc,
    bridge_available,
    in_parallel,
    start_bridge,
    start_peer,
)

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = (
    "first_token_latency",
    "throughput",
    "paced_concurrency",
    "idle_connections",
    "cancellation",
    "slow_reader",
)
HTTP_TARGETS = ("bridge", "peer")


@dataclass
class Profile:
    latency_rounds: int = 5
    latency_requests: int = 100  # per round and target
    latency_tokens: int = 50
    throughput_rounds: int = 3
    throughput_clients: int = 16
    throughput_streams_per_client: int = 2
    throughput_tokens: int = 1000
    paced_levels: list[int] = field(default_factory=lambda: [100, 250, 500, 750, 1000, 2000])
    paced_tokens: int = 200
    pacing_ms: float = 50.0
    idle_streams: int = 1000
    idle_hold_s: float = 4.0
    heartbeat_s: float = 1.0
    cancel_streams: int = 500
    cancel_after_tokens: int = 10
    slow_tokens: int = 100_000
    slow_stall_s: float = 10.0
    slow_after_tokens: int = 200


QUICK = Profile(
    latency_rounds=1,
    latency_requests=40,
    throughput_rounds=1,
    throughput_clients=4,
    throughput_streams_per_client=1,
    throughput_tokens=300,
    paced_levels=[10, 40],
    paced_tokens=10,
    pacing_ms=20.0,
    idle_streams=40,
    idle_hold_s=0.7,
    heartbeat_s=0.3,
    cancel_streams=40,
    cancel_after_tokens=3,
    slow_tokens=100_000,
    slow_stall_s=0.7,
    slow_after_tokens=50,
)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


FAST_REPEAT = 50  # the "fast" stub streams its query 50 times, so one stub serves 50 to 100 000 tokens


def words(n: int, repeat: int = 1) -> str:
    """An echo query that makes a stub with ``--repeat repeat`` stream exactly n word tokens."""
    if n % repeat:
        raise ValueError(f"{n} tokens is not a multiple of --repeat {repeat}")
    return "tok " * (n // repeat)


class Bench:
    def __init__(self, profile: Profile, quick: bool, pin: bool, workdir: Path, targets: list[str]) -> None:
        self.p = profile
        self.quick = quick
        self.workdir = workdir
        self.targets = targets
        ncpu = len(os.sched_getaffinity(0))
        # Two cores: the system under test (bridge / peer / the direct gRPC client) gets one core,
        # the stub and the HTTP load generator share the other. More cores: spread further.
        self.cpu_stub: list[int] = []
        self.cpu_sut: list[int] = []
        self.cpu_client: list[int] = []
        if pin and ncpu >= 2:
            cpus = sorted(os.sched_getaffinity(0))
            self.cpu_stub = [cpus[0]]
            self.cpu_sut = [cpus[1]]
            self.cpu_client = [cpus[2]] if ncpu >= 3 else [cpus[0]]
        self.pin = pin and ncpu >= 2
        self.kept: dict[str, tuple[StubProc, dict[str, HttpServer]]] = {}
        self.settle = 0.05 if quick else 0.5  # pause between runs so sockets and streams wind down

    # ------------------------------------------------------------------ process groups
    # A group is one stub (its flags shape every stream) with a bridge and a peer in front of it.
    # Full runs start a group per scenario and stop it after; quick runs start every group at once
    # (in parallel, start-up dominates a smoke run) and keep them until the end.
    def group_specs(self) -> dict[str, tuple[list[str], dict[str, str], dict[str, str]]]:
        p = self.p
        hb = {"HEARTBEAT_INTERVAL_S": str(p.heartbeat_s)}
        return {
            "fast": (["--repeat", str(FAST_REPEAT)], {}, {}),
            "paced": (["--token-delay-ms", str(p.pacing_ms)], {}, {}),
            "idle": (["--first-token-delay-ms", "600000"], hb, hb),
        }

    def prestart(self, names: list[str]) -> None:
        """Start the named groups at once: every stub, then every server (a gRPC channel that first
        finds its target down backs off for a second or more, so servers start after the stubs)."""
        specs = self.group_specs()
        stub_cpus = self.cpu_stub or None
        sut_cpus = self.cpu_sut or None
        stubs = in_parallel(
            {n: functools.partial(StubProc, ["--mode", "echo", *specs[n][0]], stub_cpus) for n in names}
        )
        factories: dict[str, Callable[[], Any]] = {}
        for n in names:
            target = stubs[n].target
            if "bridge" in self.targets:
                factories[f"{n}/bridge"] = functools.partial(
                    start_bridge, target, sut_cpus, self.workdir, **specs[n][1]
                )
            if "peer" in self.targets:
                factories[f"{n}/peer"] = functools.partial(start_peer, target, sut_cpus, **specs[n][2])
        try:
            servers = in_parallel(factories)
        except BaseException:
            for stub in stubs.values():
                stub.stop()
            raise
        for n in names:
            self.kept[n] = (stubs[n], {k.split("/", 1)[1]: v for k, v in servers.items() if k.startswith(n + "/")})

    def group(self, name: str) -> tuple[StubProc, dict[str, HttpServer]]:
        if name in self.kept:
            return self.kept[name]
        stub_args, bridge_env, peer_env = self.group_specs()[name]
        stub = StubProc(["--mode", "echo", *stub_args], self.cpu_stub or None)
        factories: dict[str, Callable[[], Any]] = {}
        if "bridge" in self.targets:
            factories["bridge"] = lambda: start_bridge(stub.target, self.cpu_sut or None, self.workdir, **bridge_env)
        if "peer" in self.targets:
            factories["peer"] = lambda: start_peer(stub.target, self.cpu_sut or None, **peer_env)
        try:
            servers = in_parallel(factories)
        except BaseException:
            stub.stop()
            raise
        return stub, servers

    def stop(self, stub: StubProc, servers: dict[str, HttpServer]) -> None:
        if any(stub is kept for kept, _ in self.kept.values()):
            return
        for server in servers.values():
            server.stop()
        stub.stop()

    def stop_all(self) -> None:
        kept, self.kept = self.kept, {}
        t0 = time.monotonic()
        children = [c for stub, servers in kept.values() for c in (*servers.values(), stub)]
        in_parallel({f"{i}": c.stop for i, c in enumerate(children)})
        log(f"stopped {len(children)} processes in {time.monotonic() - t0:.1f} s")

    def loadgen(self, target: str, stub: StubProc, servers: dict[str, HttpServer], *args: str) -> Loadgen:
        if target == "direct":
            return Loadgen(["grpc", "--target", stub.target, *args], self.cpu_sut or None)
        return Loadgen(["sse", "--url", servers[target].stream_url, *args], self.cpu_client or None)

    def run_loadgen(
        self, target: str, stub: StubProc, servers: dict[str, HttpServer], *args: str, timeout: float
    ) -> dict[str, Any]:
        """Run one load generator to its end; server and stub CPU deltas are added to the result."""
        server = servers.get(target)
        cpu0 = server.cpu_s() if server else None
        stub0 = stub.cpu_s()
        lg = self.loadgen(target, stub, servers, *args)
        result = lg.result(timeout)
        result["server_cpu_s"] = (server.cpu_s() - cpu0) if server and cpu0 is not None else None
        result["stub_cpu_s"] = stub.cpu_s() - stub0
        return result

    def interleaved(
        self, scenario: str, rounds: int, stub: StubProc, servers: dict[str, HttpServer], args: list[str]
    ) -> dict[str, list[dict[str, Any]]]:
        """``rounds`` runs of the same load per target, targets interleaved within each round, so
        a slow phase of a noisy host hits every target rather than one."""
        per: dict[str, list[dict[str, Any]]] = {t: [] for t in self.targets}
        for round_ in range(rounds):
            for target in self.targets:
                log(f"{scenario} round {round_ + 1}/{rounds}: {target}")
                per[target].append(self.run_loadgen(target, stub, servers, *args, timeout=180))
        return per

    def warm_up(self, target: str, stub: StubProc, servers: dict[str, HttpServer], *args: str, timeout: float) -> None:
        """One throw-away run before a memory measurement: the first streams pay for imports,
        pools and caches, not per connection. Skipped in --quick runs."""
        if not self.quick:
            self.loadgen(target, stub, servers, *args).result(timeout)

    # ------------------------------------------------------------------ scenarios
    def first_token_latency(self) -> dict[str, Any]:
        p = self.p
        stub, servers = self.group("fast")
        try:
            per = self.interleaved(
                "first_token_latency",
                p.latency_rounds,
                stub,
                servers,
                ["--query", words(p.latency_tokens, FAST_REPEAT), "--concurrency", "1",
                 "--requests", str(p.latency_requests), "--warmup", "5", "--max-s", "120"],
            )
        finally:
            self.stop(stub, servers)
        out: dict[str, Any] = {
            "params": {
                "clients": 1,
                "tokens": p.latency_tokens,
                "delay_ms": 0,
                "requests_per_target": p.latency_rounds * p.latency_requests,
            },
            "targets": {},
        }
        for target, results in per.items():
            values = [v for r in results for v in r.get("first_token_ms_all", [])]
            out["targets"][target] = {
                "first_token_ms": summarize(values),
                "round_p50s": [r["first_token_ms"]["p50"] for r in results],
                "completed": sum(r["completed"] for r in results),
                "errors": merge_counts(r["errors"] for r in results),
                "loadgen_cpu_utilisation": statistics.median(r["cpu_utilisation"] for r in results),
                "samples_ms": values,
            }
        direct = out["targets"].get("direct", {}).get("first_token_ms")
        if direct:
            out["added_ms"] = {
                t: {q: sub(out["targets"][t]["first_token_ms"][q], direct[q]) for q in ("p50", "p95", "p99")}
                for t in HTTP_TARGETS
                if t in out["targets"]
            }
        return out

    def throughput(self) -> dict[str, Any]:
        p = self.p
        stub, servers = self.group("fast")
        requests = p.throughput_clients * p.throughput_streams_per_client
        try:
            per = self.interleaved(
                "throughput",
                p.throughput_rounds,
                stub,
                servers,
                ["--query", words(p.throughput_tokens, FAST_REPEAT), "--concurrency", str(p.throughput_clients),
                 "--requests", str(requests), "--max-s", "120"],
            )
        finally:
            self.stop(stub, servers)
        out: dict[str, Any] = {
            "params": {
                "clients": p.throughput_clients,
                "tokens": p.throughput_tokens,
                "streams_per_round": requests,
                "rounds": p.throughput_rounds,
            },
            "targets": {},
        }
        for target, results in per.items():
            best = {
                "tokens_per_s": statistics.median(r["tokens_per_s"] or 0 for r in results),
                "tokens_per_s_rounds": [r["tokens_per_s"] for r in results],
                "tokens": sum(r["tokens"] for r in results),
                "completed": sum(r["completed"] for r in results),
                "errors": merge_counts(r["errors"] for r in results),
                "stub_cpu_s_per_1k_tokens": per_1k(results, "stub_cpu_s"),
                "loadgen_cpu_s_per_1k_tokens": per_1k(results, "cpu_s"),
                "loadgen_cpu_utilisation": statistics.median(r["cpu_utilisation"] for r in results),
                "first_token_ms_p50": statistics.median(r["first_token_ms"]["p50"] or 0 for r in results),
            }
            if target != "direct":
                best["server_cpu_s_per_1k_tokens"] = per_1k(results, "server_cpu_s")
                best["server_cpu_utilisation"] = sum(r["server_cpu_s"] for r in results) / max(
                    1e-9, sum(r["wall_s"] for r in results)
                )
            out["targets"][target] = best
        return out

    def paced_concurrency(self) -> dict[str, Any]:
        p = self.p
        stub, servers = self.group("paced")
        levels: dict[str, list[dict[str, Any]]] = {t: [] for t in self.targets}
        stream_s = p.paced_tokens * p.pacing_ms / 1000
        try:
            for level in p.paced_levels:
                for target in self.targets:
                    log(f"paced_concurrency {level} streams: {target}")
                    ramp = min(2.0, level / 1000)
                    r = self.run_loadgen(
                        target,
                        stub,
                        servers,
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
                    levels[target].append(
                        {
                            "streams": level,
                            "completed": r["completed"],
                            "errors": r["errors"],
                            "error_examples": r["error_examples"],
                            "gap_ms": r["gap_ms"],
                            "first_token_ms": {k: r["first_token_ms"][k] for k in ("p50", "p99", "max")},
                            "loadgen_cpu_utilisation": r["cpu_utilisation"],
                            "server_cpu_utilisation": (r["server_cpu_s"] / r["wall_s"])
                            if r["server_cpu_s"] is not None
                            else None,
                            "stub_cpu_utilisation": r["stub_cpu_s"] / r["wall_s"],
                            # The stub is Python too; pinned to one core it cannot pace more than about
                            # 1 / (its CPU per token) tokens/s, and then every target misses the pace.
                            "stub_saturated": bool(self.pin and r["stub_cpu_s"] / r["wall_s"] > 0.85),
                        }
                    )
                    time.sleep(self.settle)  # let the previous level's sockets and streams wind down
        finally:
            self.stop(stub, servers)
        limit = 2 * p.pacing_ms
        out: dict[str, Any] = {
            "params": {
                "pacing_ms": p.pacing_ms,
                "tokens": p.paced_tokens,
                "levels": p.paced_levels,
                "knee_p99_gap_ms": limit,
            },
            "targets": {},
        }
        for target, rows in levels.items():
            passing = [row["streams"] for row in rows if ok_level(row, limit)]
            failing = [row["streams"] for row in rows if not ok_level(row, limit)]
            # The highest level before the first failing one holds the pace.
            first_fail = min(failing) if failing else None
            held = max((s for s in passing if first_fail is None or s < first_fail), default=0)
            out["targets"][target] = {
                "levels": rows,
                "knee_streams": first_fail,
                "max_paced_streams": held,
                "knee_is_lower_bound": first_fail is None,
            }
        return out

    def idle_connections(self) -> dict[str, Any]:
        p = self.p
        stub, servers = self.group("idle")
        out: dict[str, Any] = {
            "params": {"streams": p.idle_streams, "heartbeat_s": p.heartbeat_s, "first_token_delay_ms": 600000},
            "targets": {},
        }
        try:
            for target in [t for t in self.targets if t in HTTP_TARGETS]:
                server = servers[target]
                log(f"idle_connections {p.idle_streams} streams: {target}")
                self.warm_up(target, stub, servers, "--query", "idle", "--concurrency", "50", "--hold-s", "0.5",
                             "--max-s", "20", timeout=40)
                time.sleep(self.settle)
                before = server.rss()
                lg = self.loadgen(
                    target,
                    stub,
                    servers,
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
                time.sleep(self.settle)
                after = server.rss()
                opened = max(1, ready["open"])
                out["targets"][target] = {
                    "open_streams": ready["open"],
                    "rss_before_mib": before / 2**20,
                    "rss_during_mib": during / 2**20,
                    "rss_after_close_mib": after / 2**20,
                    "rss_per_stream_kib": (during - before) / opened / 1024,
                    "heartbeats_received": result["heartbeats"],
                    "errors": result["errors"],
                }
            if "direct" in self.targets and not self.quick:
                # No middle process: measure the gRPC client itself, by difference of two stream counts,
                # to show how much of a bridge's per-stream memory is grpc.aio's own cost.
                log(f"idle_connections {p.idle_streams} streams: direct (gRPC client RSS by difference)")
                small = max(1, p.idle_streams // 20)
                rss: dict[int, int] = {}
                for n in (small, p.idle_streams):
                    lg = self.loadgen(
                        "direct",
                        stub,
                        servers,
                        "--query",
                        "idle",
                        "--concurrency",
                        str(n),
                        "--hold-s",
                        str(min(1.0, p.idle_hold_s)),
                        "--max-s",
                        "60",
                    )
                    ready = lg.event("ready", 90)
                    time.sleep(min(0.5, p.idle_hold_s / 2))
                    rss[n] = lg.rss()
                    lg.result(90)
                out["targets"]["direct"] = {
                    "open_streams": p.idle_streams,
                    "method": f"client RSS with {p.idle_streams} streams minus with {small}, per stream",
                    "rss_per_stream_kib": (rss[p.idle_streams] - rss[small]) / (p.idle_streams - small) / 1024
                    if p.idle_streams > small
                    else None,
                    "ready_streams": ready["streams"],
                }
        finally:
            self.stop(stub, servers)
        return out

    def cancellation(self) -> dict[str, Any]:
        p = self.p
        stub, servers = self.group("paced")
        out: dict[str, Any] = {
            "params": {
                "streams": p.cancel_streams,
                "close_after_tokens": p.cancel_after_tokens,
                "pacing_ms": p.pacing_ms,
                "tokens": p.paced_tokens,
            },
            "targets": {},
        }
        try:
            for target in self.targets:
                log(f"cancellation {p.cancel_streams} streams: {target}")
                r = self.run_loadgen(
                    target,
                    stub,
                    servers,
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
                closed = {rid: at for rid, at, _ in r.get("closed", []) if rid and at}
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:  # bounded: wait for the stub's stream_end lines
                    ends = stub.ends()
                    if all(rid in ends for rid in closed):
                        break
                    time.sleep(0.05)
                ends = stub.ends()
                delays = [
                    (ends[rid]["ended_at"] - at) * 1000
                    for rid, at in closed.items()
                    if rid in ends and ends[rid]["outcome"] == "cancelled"
                ]
                outcomes: dict[str, int] = {}
                for rid in closed:
                    key = ends[rid]["outcome"] if rid in ends else "no stream_end line"
                    outcomes[key] = outcomes.get(key, 0) + 1
                out["targets"][target] = {
                    "closed": len(closed),
                    "no_request_id": sum(1 for rid, at, _ in r.get("closed", []) if not rid),
                    "outcomes": outcomes,
                    "close_to_cancelled_ms": summarize(delays),
                    "samples_ms": delays,
                    "errors": r["errors"],
                }
                time.sleep(self.settle)
        finally:
            self.stop(stub, servers)
        return out

    def slow_reader(self) -> dict[str, Any]:
        p = self.p
        stall = str(p.slow_stall_s)
        slow_query = words(p.slow_tokens, FAST_REPEAT)  # 2 000 words x 50 = 100 000 tokens; 8 000 bytes
        stub, servers = self.group("fast")
        out: dict[str, Any] = {
            "params": {
                "upstream_tokens": p.slow_tokens,
                "stall_s": p.slow_stall_s,
                "stall_after_tokens": p.slow_after_tokens,
                "client_rcvbuf": 65536,
            },
            "targets": {},
        }
        try:
            for target in [t for t in self.targets if t in HTTP_TARGETS]:
                server = servers[target]
                log(f"slow_reader {p.slow_stall_s}s stall: {target}")
                self.warm_up(target, stub, servers, "--query", slow_query, "--stall-after-tokens", "2000",
                             "--stall-s", "0.2", "--rcvbuf", "65536", "--max-s", "30", timeout=60)
                time.sleep(self.settle)
                before = server.rss()
                stub_ends_before = set(stub.ends())
                with Sampler(server) as sampler:
                    lg = self.loadgen(
                        target,
                        stub,
                        servers,
                        "--query",
                        slow_query,
                        "--stall-after-tokens",
                        str(p.slow_after_tokens),
                        "--stall-s",
                        stall,
                        "--rcvbuf",
                        "65536",
                        "--max-s",
                        str(p.slow_stall_s + 60),
                    )
                    stalled = lg.event("stalling", 60)
                    result = lg.result(p.slow_stall_s + 90)
                peak_during = max((rss for t, rss in sampler.samples if t >= stalled["at"]), default=before)
                time.sleep(self.settle)
                ends = {k: v for k, v in stub.ends().items() if k not in stub_ends_before}
                out["targets"][target] = {
                    "rss_before_mib": before / 2**20,
                    "rss_peak_during_stall_mib": peak_during / 2**20,
                    "rss_growth_mib": (peak_during - before) / 2**20,
                    "client_tokens_read": result["tokens"],
                    "upstream_tokens_sent": [e["tokens_sent"] for e in ends.values()],
                    "upstream_outcomes": [e["outcome"] for e in ends.values()],
                    "rss_series_mib": [
                        (round(t - stalled["at"], 3), round(rss / 2**20, 3))
                        for t, rss in sampler.samples[:: max(1, len(sampler.samples) // 400)]
                    ],
                }
        finally:
            self.stop(stub, servers)
        return out


def ok_level(row: dict[str, Any], limit: float) -> bool:
    p99 = row["gap_ms"]["p99"]
    return p99 is not None and p99 <= limit and row["completed"] >= row["streams"] * 0.99


def merge_counts(dicts: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def per_1k(results: list[dict[str, Any]], key: str) -> float | None:
    tokens = int(sum(r["tokens"] for r in results))
    values = [r[key] for r in results]
    if not tokens or any(v is None for v in values):
        return None
    total = float(sum(values))
    return total / tokens * 1000


def sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def div(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


# ---------------------------------------------------------------------------------------- verdicts


def checks(s: dict[str, Any]) -> list[dict[str, Any]]:
    """Every README target as {name, value, target, met}; value None when it could not be measured."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, op: str, limit: float, unit: str, note: str = "") -> None:
        met = None if value is None else (value <= limit if op == "<=" else value >= limit)
        out.append({"name": name, "value": value, "target": f"{op} {limit:g}{unit}", "met": met, "note": note})

    def t(scenario: str, target: str) -> dict[str, Any]:
        return dict(s.get(scenario, {}).get("targets", {}).get(target, {}))

    added = s.get("first_token_latency", {}).get("added_ms", {})
    if added:
        b, pr = added.get("bridge", {}).get("p50"), added.get("peer", {}).get("p50")
        add(
            "added first-token latency p50, bridge / peer",
            div(b, pr),
            "<=",
            0.5,
            "x",
            f"bridge +{fmt(b)} ms, peer +{fmt(pr)} ms over direct gRPC",
        )
    tb, td = t("throughput", "bridge").get("tokens_per_s"), t("throughput", "direct").get("tokens_per_s")
    add("throughput, bridge / direct gRPC", div(tb, td), ">=", 0.7, "x", f"{fmt(tb, 0)} vs {fmt(td, 0)} tokens/s")
    kb = t("paced_concurrency", "bridge").get("max_paced_streams")
    kd = t("paced_concurrency", "direct").get("max_paced_streams")
    kp = t("paced_concurrency", "peer").get("max_paced_streams")
    bound = {k: bool(t("paced_concurrency", k).get("knee_is_lower_bound")) for k in ("bridge", "direct", "peer")}

    def held(value: Any, target: str) -> str:
        return f"{value}{'+' if bound[target] else ''}"

    for other, limit in (("direct", 0.8), ("peer", 1.5)):
        kother = kd if other == "direct" else kp
        ratio = div(kb, kother)
        add(
            f"paced streams held, bridge / {'direct gRPC' if other == 'direct' else 'peer'}",
            ratio,
            ">=",
            limit,
            "x",
            f"{held(kb, 'bridge')} vs {held(kother, other)} streams with p99 gap <= 2x pacing",
        )
        # A ratio of two lower bounds says nothing; bridge-bounded vs other-measured is a lower bound too.
        if out[-1]["met"] is False and bound["bridge"]:
            out[-1]["met"] = None
            out[-1]["note"] += "; inconclusive: the bridge held every level, add higher --paced-levels"
    add("idle RSS per stream (bridge)", t("idle_connections", "bridge").get("rss_per_stream_kib"), "<=", 30, " KiB")
    add(
        "cancellation p99 (bridge)",
        t("cancellation", "bridge").get("close_to_cancelled_ms", {}).get("p99"),
        "<=",
        20,
        " ms",
    )
    add("slow reader RSS growth (bridge)", t("slow_reader", "bridge").get("rss_growth_mib"), "<=", 2, " MiB")
    return out


def fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def markdown(report: dict[str, Any]) -> str:
    m = report["meta"]
    s = report["scenarios"]
    lines = [
        f"Benchmark of {m['git_commit']} on {m['date']}: {m['machine']['nproc']} x {m['machine']['cpu_model']}, "
        f"Python {m['machine']['python']}, {'quick' if m['quick'] else 'full'} run, "
        f"pinning {'on' if m['pinned'] else 'off'}, load average {m['loadavg_start'][0]:.1f} at start "
        f"and {m.get('loadavg_end', (float('nan'),))[0]:.1f} at the end (other work on the host skews results).",
        "",
        "| measure | bridge | direct gRPC | reference peer |",
        "|---|---:|---:|---:|",
    ]

    def row(label: str, scenario: str, getter: Callable[[dict[str, Any]], Any], digits: int = 2) -> None:
        cells = []
        for target in ("bridge", "direct", "peer"):
            data = s.get(scenario, {}).get("targets", {}).get(target)
            cells.append(fmt(getter(data), digits) if data else "–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    for q in ("p50", "p95", "p99"):
        row(
            f"first token ms {q} (1 client, 50 tokens)",
            "first_token_latency",
            functools.partial(lambda d, q: d["first_token_ms"][q], q=q),
        )
    added = s.get("first_token_latency", {}).get("added_ms", {})
    if added:
        lines.append(
            "| added first-token ms p50 / p99 over gRPC | "
            f"{fmt(added.get('bridge', {}).get('p50'))} / {fmt(added.get('bridge', {}).get('p99'))} | 0 | "
            f"{fmt(added.get('peer', {}).get('p50'))} / {fmt(added.get('peer', {}).get('p99'))} |"
        )
    row("throughput tokens/s (16 clients)", "throughput", lambda d: d["tokens_per_s"], 0)
    row(
        "CPU s per 1 000 tokens (direct: the gRPC client itself)",
        "throughput",
        lambda d: d.get("server_cpu_s_per_1k_tokens") or d.get("loadgen_cpu_s_per_1k_tokens"),
        4,
    )
    row("load generator CPU share (throughput)", "throughput", lambda d: d["loadgen_cpu_utilisation"])
    # The stub shares core 0 with the HTTP load generator: their sum near 1.0 means core 0, not the
    # system under test, capped that run (the direct client has core 1 and needs no HTTP client).
    row(
        "stub CPU share (throughput)",
        "throughput",
        lambda d: d["stub_cpu_s_per_1k_tokens"] * d["tokens_per_s"] / 1000 if d.get("tokens_per_s") else None,
    )
    row(
        "core 0 ceiling tokens/s: 1 / (stub + HTTP load generator CPU per token)",
        "throughput",
        lambda d: 1000 / (d["stub_cpu_s_per_1k_tokens"] + d["loadgen_cpu_s_per_1k_tokens"])
        if d.get("server_cpu_s_per_1k_tokens") else None,
        0,
    )
    pc = s.get("paced_concurrency", {})
    for i, level in enumerate(pc.get("params", {}).get("levels", [])):
        row(
            f"paced p99 gap ms @ {level} streams",
            "paced_concurrency",
            functools.partial(lambda d, i: d["levels"][i]["gap_ms"]["p99"] if i < len(d["levels"]) else None, i=i),
            1,
        )
    row(
        "paced streams held (p99 gap <= 2x pacing)",
        "paced_concurrency",
        lambda d: f"{d['max_paced_streams']}{'+' if d['knee_is_lower_bound'] else ''}",
    )
    row(
        "idle RSS KiB per stream (direct: the gRPC client's own)",
        "idle_connections",
        lambda d: d["rss_per_stream_kib"],
        1,
    )
    row("close -> upstream cancelled ms p50", "cancellation", lambda d: d["close_to_cancelled_ms"]["p50"])
    row("close -> upstream cancelled ms p99", "cancellation", lambda d: d["close_to_cancelled_ms"]["p99"])
    row("slow reader RSS growth MiB", "slow_reader", lambda d: d["rss_growth_mib"], 3)
    lines += ["", "| target | measured | goal | met |", "|---|---:|---:|:-:|"]
    for c in report["checks"]:
        met = {True: "yes", False: "**no**", None: "n/a"}[c["met"]]
        lines.append(
            f"| {c['name']} ({c['note']}) | {fmt(c['value'])} | {c['target']} | {met} |"
            if c["note"]
            else f"| {c['name']} | {fmt(c['value'])} | {c['target']} | {met} |"
        )
    return "\n".join(lines)


def chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["scenarios"]
    colours = {"bridge": "tab:blue", "direct": "tab:green", "peer": "tab:red"}
    names = {"bridge": "bali-zero-bridge", "direct": "direct gRPC", "peer": "reference peer"}
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax = axes[0][0]
    for target, data in s.get("first_token_latency", {}).get("targets", {}).items():
        values = sorted(data.get("samples_ms", []))
        if values:
            ax.plot(
                values, [i / len(values) for i in range(1, len(values) + 1)], label=names[target], color=colours[target]
            )
    ax.set_title("First-token latency (1 client, 50 tokens), CDF")
    ax.set_xlabel("ms from request to first token")
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax = axes[0][1]
    pc = s.get("paced_concurrency", {})
    for target, data in pc.get("targets", {}).items():
        xs = [row["streams"] for row in data["levels"]]
        ys = [row["gap_ms"]["p99"] or 0 for row in data["levels"]]
        ax.plot(xs, ys, marker="o", label=names[target], color=colours[target])
    if pc:
        ax.axhline(pc["params"]["knee_p99_gap_ms"], ls="--", color="grey", label="2 x pacing")
        ax.axhline(pc["params"]["pacing_ms"], ls=":", color="grey", label="pacing")
    ax.set_title("Paced streams: p99 inter-token gap vs concurrency (the knee)")
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("p99 gap, ms")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax = axes[1][0]
    tp = s.get("throughput", {}).get("targets", {})
    if tp:
        keys = list(tp)
        ax.bar([names[k] for k in keys], [tp[k]["tokens_per_s"] for k in keys], color=[colours[k] for k in keys])
        for i, k in enumerate(keys):
            ax.text(i, tp[k]["tokens_per_s"], f"{tp[k]['tokens_per_s']:,.0f}", ha="center", va="bottom")
    ax.set_title("Throughput, 16 clients x 1 000-token streams (tokens/s)")
    ax.grid(alpha=0.3, axis="y")
    ax = axes[1][1]
    for target, data in s.get("cancellation", {}).get("targets", {}).items():
        values = sorted(v for v in data.get("samples_ms", []))
        if values:
            ax.plot(
                values, [i / len(values) for i in range(1, len(values) + 1)], label=names[target], color=colours[target]
            )
    ax.axvline(20, ls="--", color="grey", label="20 ms goal")
    ax.set_title("Client close -> upstream cancelled, CDF")
    ax.set_xlabel("ms")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.suptitle(
        f"bali-zero-bridge {report['meta']['git_commit']} — {report['meta']['date']} — "
        f"{report['meta']['machine']['nproc']} x {report['meta']['machine']['cpu_model']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> dict[str, Any]:
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "uncommitted"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def strip_samples(report: dict[str, Any]) -> None:
    """Keep raw samples out of the JSON when they would make it large (the chart already used them)."""
    for scenario in report["scenarios"].values():
        for data in scenario.get("targets", {}).values():
            if isinstance(data, dict) and len(data.get("samples_ms", [])) > 5000:
                data["samples_ms"] = data["samples_ms"][:: len(data["samples_ms"]) // 5000 + 1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny numbers, ~10 s (CI smoke)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="report directory")
    parser.add_argument("--only", default="", help="comma-separated scenarios (default: all)")
    parser.add_argument(
        "--pin",
        choices=("on", "off"),
        default="on",
        help="pin the system under test to its own core (default on; see README)",
    )
    parser.add_argument("--targets", default="bridge,direct,peer", help="comma-separated subset")
    parser.add_argument("--paced-levels", default="", help="override, e.g. 100,500,1000,2000,3000")
    args = parser.parse_args(argv)
    only = [x for x in args.only.split(",") if x] or list(SCENARIOS)
    unknown = set(only) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {sorted(unknown)}")
    profile = QUICK if args.quick else Profile()
    if args.paced_levels:
        profile.paced_levels = [int(x) for x in args.paced_levels.split(",")]
    targets = [t for t in args.targets.split(",") if t]
    if "bridge" in targets and not bridge_available():
        log("our bridge is not importable yet (python -m bridge); measuring direct gRPC and the peer only")
        targets.remove("bridge")
    raise_fd_limit()  # children inherit it: thousands of sockets in the bridge and the load generator
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    report: dict[str, Any] = {
        "meta": {
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "git_commit": git_commit(),
            "machine": machine(),
            "quick": args.quick,
            "pinned": False,
            "targets": targets,
            "profile": asdict(profile),
            "fd_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            # Other work on the host skews every number: the load average says how quiet it was.
            "loadavg_start": os.getloadavg(),
        },
        "scenarios": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        bench = Bench(profile, args.quick, args.pin == "on", Path(tmp), targets)
        report["meta"]["pinned"] = bench.pin
        report["meta"]["cpus"] = {
            "stub": bench.cpu_stub,
            "system_under_test": bench.cpu_sut,
            "http_loadgen": bench.cpu_client,
        }
        if args.quick:
            needed = {
                "first_token_latency": "fast",
                "throughput": "fast",
                "paced_concurrency": "paced",
                "cancellation": "paced",
                "idle_connections": "idle",
                "slow_reader": "fast",
            }
            t0 = time.monotonic()
            bench.prestart(sorted({needed[n] for n in only}))
            log(f"started {len(bench.kept)} process groups in {time.monotonic() - t0:.1f} s")
        for name in only:
            t0 = time.monotonic()
            try:
                report["scenarios"][name] = getattr(bench, name)()
            except Exception as exc:  # a failed scenario is reported, the others still run
                log(f"{name} failed: {type(exc).__name__}: {exc}")
                report["scenarios"][name] = {"error": f"{type(exc).__name__}: {exc}", "targets": {}}
            report["scenarios"][name]["elapsed_s"] = time.monotonic() - t0
        bench.stop_all()
    report["meta"]["elapsed_s"] = time.monotonic() - started
    report["meta"]["loadavg_end"] = os.getloadavg()
    report["checks"] = checks(report["scenarios"])
    try:
        chart(report, args.out / "chart.png")
    except Exception as exc:  # the JSON report matters more than the picture
        log(f"chart failed: {type(exc).__name__}: {exc}")
    strip_samples(report)
    (args.out / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    table = markdown(report)
    (args.out / "table.md").write_text(table + "\n")
    print(table)
    log(f"wrote {args.out / 'report.json'} and {args.out / 'chart.png'} in {report['meta']['elapsed_s']:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
