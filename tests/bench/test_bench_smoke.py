"""Smoke test of the benchmark harness: `python -m bench.run --quick` produces a complete report.

Benchmarks are not timed tests: this checks that every scenario ran and produced numbers for
every target it measures, never what the numbers are.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.procs import bridge_available
from tests.support.processes import ROOT, base_env

SCENARIOS = {
    # scenario: (targets measured, a path to one number per target)
    "first_token_latency": (("bridge", "direct", "peer"), ("first_token_ms", "p99")),
    "throughput": (("bridge", "direct", "peer"), ("tokens_per_s",)),
    "paced_concurrency": (("bridge", "direct", "peer"), ("max_paced_streams",)),
    "idle_connections": (("bridge", "peer"), ("rss_per_stream_kib",)),
    "cancellation": (("bridge", "direct", "peer"), ("close_to_cancelled_ms", "p99")),
    "slow_reader": (("bridge", "peer"), ("rss_growth_mib",)),
}


def dig(data: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        data = data[key]
    return data


def run_module(module: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``python -m module args`` from the project root; fails the test on a non-zero exit."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.timeout(150)
def test_quick_bench_reports_every_scenario(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = run_module("bench.run", "--quick", "--out", str(out), timeout=140)
    report = json.loads((out / "report.json").read_text())
    assert (out / "chart.png").stat().st_size > 10_000
    assert "| measure | bridge | direct gRPC | reference peer |" in proc.stdout

    meta = report["meta"]
    assert meta["quick"] is True
    assert meta["machine"]["nproc"] >= 1 and meta["machine"]["cpu_model"]
    assert meta["git_commit"]
    expected_targets = {"direct", "peer"} | ({"bridge"} if bridge_available() else set())
    assert set(meta["targets"]) == expected_targets

    for scenario, (targets, path) in SCENARIOS.items():
        data = report["scenarios"][scenario]
        assert "error" not in data, f"{scenario}: {data.get('error')}"
        for target in set(targets) & expected_targets:
            entry = data["targets"][target]
            value = dig(entry, path)
            assert isinstance(value, int | float) and math.isfinite(value), f"{scenario}/{target}: {value!r}"

    # Streams really ran end to end (not numbers from empty runs).
    for target in expected_targets:
        assert report["scenarios"]["throughput"]["targets"][target]["completed"] > 0
        cancelled = report["scenarios"]["cancellation"]["targets"][target]["outcomes"].get("cancelled", 0)
        assert cancelled > 0, report["scenarios"]["cancellation"]["targets"][target]

    names = {c["name"] for c in report["checks"]}
    assert len(names) == 7
    for check in report["checks"]:
        assert check["met"] in (True, False, None)


@pytest.mark.timeout(120)
def test_ab_compares_two_trees_and_direct_grpc() -> None:
    """``bench.ab`` runs a bridge from each named tree (here the same tree twice) and direct gRPC."""
    proc = run_module("bench.ab", "--rounds", "1", f"a={ROOT}", f"b={ROOT}", timeout=110)
    rows = {line.split()[0]: line for line in proc.stdout.splitlines() if "first token ms p50" in line}
    assert set(rows) == {"a", "b", "direct"}
    for row in rows.values():
        assert "(n=100)" in row


@pytest.mark.timeout(120)
def test_timeline_finds_every_probe_of_the_bridge(tmp_path: Path) -> None:
    """A rename in the request path must fail here, not leave a phase silently out of the timeline."""
    out = tmp_path / "timeline.json"
    run_module(
        "bench.lab.timeline",
        "--servers",
        "bridge,peer",
        "--requests",
        "8",
        "--warmup",
        "2",
        "--pin",
        "off",
        "--out",
        str(out),
        timeout=110,
    )
    bridge, peer = json.loads(out.read_text())
    assert bridge["server"] == "bridge" and bridge["requests"] == 8
    assert bridge["unresolved"] == []
    phases = {step["phase"] for step in bridge["steps"]}
    assert {
        "ASGI receive (parse, task start)",
        "identity",
        "rate limit",
        "input parsing",
        "stream cap",
        "span",
        "gRPC call start",
        "first message",
        "first frame built",
        "first byte written",
    } <= phases
    assert bridge["total"]["hops"] >= 2  # at least the pump's read and the response's write
    assert 0 < bridge["total"]["loop_cpu_us"] <= bridge["total"]["wall_us"]
    # The peer has none of the bridge's own functions, but the server- and gRPC-level probes fire.
    assert peer["server"] == "peer" and peer["unresolved"] == []
    assert {"ASGI receive (parse, task start)", "gRPC call start", "first byte written"} <= {
        step["phase"] for step in peer["steps"]
    }
    # The first-token path (issue 17): no separate wait for the initial metadata, and no more
    # event-loop hand-offs from request to first token than the obvious bridge.
    assert "initial metadata" not in phases
    assert bridge["total"]["hops"] <= peer["total"]["hops"]
    # From the first message (metadata) to the first token written, only the pump's read of the
    # token wakes a task: the request task sleeps until the token is out. Woken at the first
    # message, its bookkeeping sat between the two on the core gRPC's threads need.
    steps = bridge["steps"]
    after_first = next(i for i, step in enumerate(steps) if step["start"] == "first_message")
    assert sum(step["hops"] for step in steps[after_first:]) <= 1, steps[after_first:]


@pytest.mark.timeout(120)
def test_ab_compares_the_two_routes_of_one_bridge() -> None:
    """``bench.ab --routes``: the native and the OpenAI-compatible route of one bridge, and direct gRPC."""
    proc = run_module("bench.ab", "--routes", "--rounds", "1", timeout=110)
    rows = {line.split()[0]: line for line in proc.stdout.splitlines() if "first token ms p50" in line}
    assert set(rows) == {"native", "native-post", "openai", "direct"}
    for row in rows.values():
        assert "(n=100)" in row
    assert "openai      median added" in proc.stdout and "below native-post in" in proc.stdout


def test_loadgen_reads_the_openai_stream_as_the_native_frames_it_stands_for() -> None:
    """The load generator's splitter over the bridge's own chunk encoder, cut at every byte."""
    from bali_zero.rag.v1 import rag_pb2
    from bench.loadgen import OpenAIEvents
    from bridge.errors import ServiceUnavailable
    from bridge.openai_compat import KEEP_ALIVE, ChatCompletionChunks
    from bridge.types import StreamResult

    chunks = ChatCompletionChunks("s1", "r1", "bali-zero", include_usage=True)
    answer = (
        chunks.metadata(1, rag_pb2.Metadata(model="echo"))
        + chunks.token(2, 0, rag_pb2.Token(text="tok "))
        + KEEP_ALIVE
        + chunks.token(3, 1, rag_pb2.Token(text='"delta":{"content":'))
        + chunks.done(4, StreamResult("s1", "r1", "completed", 2, 1.0, 0.5, None, "stop"))
    )
    for cut in range(len(answer)):
        events = OpenAIEvents()
        tokens, told = events.feed(answer[:cut])
        more, told_more = events.feed(answer[cut:])
        assert tokens + more == 2, cut
        kinds = [
            json.loads(payload)["type"] if event == "message" and payload != b"{}" else event
            for event, payload in told + told_more
        ]
        assert [k for k in kinds if k != "message"] == ["metadata", "heartbeat", "done"], (cut, kinds)
    without_metadata = ChatCompletionChunks("s2", "r2", "bali-zero", include_usage=False)
    tokens, told = OpenAIEvents().feed(
        without_metadata.token(1, 0, rag_pb2.Token(text="a")) + without_metadata.error(2, ServiceUnavailable("x"))
    )
    assert tokens == 1 and [json.loads(p)["type"] for _, p in told] == ["error"]


@pytest.mark.timeout(150)
def test_workers_bench_with_a_cpu_budget_reports_both_targets(tmp_path: Path) -> None:
    out = tmp_path / "workers.json"
    run_module(
        "bench.workers",
        *("--levels", "4,8", "--rounds", "1", "--tokens", "5", "--pacing-ms", "10"),
        *("--cores-per-worker", "0.5", "--out", str(out)),
        timeout=140,
    )
    report = json.loads(out.read_text())
    assert report["cores_per_worker"] == 0.5
    runs = report["rounds"][0]
    assert {run["workers"] for run in runs} == {1, 2}
    for run in runs:
        assert run["completed"] == run["streams"], run
        assert len(run["worker_cpu_s"]) == run["workers"]
        assert run["throttled_s"] >= 0
    assert set(report["summary"]["held"]) == {"1", "2"}
