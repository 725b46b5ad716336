"""The first-token timeline: where one request's time goes between its bytes and its first token.

    python -m bench.lab.timeline                       # the bridge, then the reference peer
    python -m bench.lab.timeline --servers bridge --requests 300 --out timeline.json

One echo stub, then each server in turn under ``bench.lab.probes`` (probes wrapped around its request
path in its own process; the production code has none), and one client (``bench.loadgen``, one
request at a time, 50-token answers, as in the first_token_latency scenario). Each interval between
two consecutive marks is reported as the median over the requests of its wall time, the CPU of
the event-loop thread, the CPU of the whole process, and the event-loop hops (task steps) in it.
The probes cost a few microseconds per mark and one counted step per task resumption, so the
absolute figures are a little above an unprobed run: compare intervals with each other, and use
``bench.ab`` for before/after figures.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.procs import Loadgen, StubProc, start_probed
from bench.results import Summary, TimelineResult, TimelineStep
from bench.workload import FAST_REPEAT, log, words

CPU_STUB, CPU_SUT = [0], [1]  # as in bench.run: the stub and the HTTP load generator share core 0

# (start mark, end mark) -> the phase named in the timeline; other intervals are the code between.
PHASES: dict[tuple[str, str], str] = {
    ("received", "app_called"): "ASGI receive (parse, task start)",
    ("app_called", "endpoint_called"): "routing (middleware, router)",
    ("identity_start", "identity_done"): "identity",
    ("rate_limit_start", "rate_limit_done"): "rate limit",
    ("input_start", "input_done"): "input parsing",
    ("stream_cap_start", "stream_cap_done"): "stream cap",
    ("span_start", "span_done"): "span",
    ("grpc_call_start", "grpc_call_started"): "gRPC call start",
    ("metadata_wait", "metadata_received"): "initial metadata",
    ("first_read", "first_message"): "first message",
}
END_PHASES = {
    "first_frame_built": "first frame built",
    "first_token_written": "first byte written",
    "headers_written": "response headers written",
}


def summarise(
    server: str, raw: dict[str, Any], warmup: int, client: Summary, loadavg: Sequence[float]
) -> TimelineResult:
    """Medians per interval over the records after ``warmup``; intervals seen in under half are left out."""
    records: list[dict[str, list[int]]] = raw["records"][warmup:]
    per: dict[tuple[str, str], list[list[int]]] = {}
    totals: list[list[int]] = []
    for record in records:
        marks = sorted(record.items(), key=lambda item: item[1][0])
        for (start, a), (end, b) in itertools.pairwise(marks):
            per.setdefault((start, end), []).append([y - x for x, y in zip(a, b, strict=True)])
        first, last = marks[0][1], marks[-1][1]
        totals.append([y - x for x, y in zip(first, last, strict=True)])
    order = {
        key: statistics.median(record[key[1]][0] - record["received"][0] for record in records if key[1] in record)
        for key in per
    }
    steps = [
        _step(key, deltas)
        for key, deltas in sorted(per.items(), key=lambda kv: order[kv[0]])
        if len(deltas) * 2 >= len(records)
    ]
    return TimelineResult(
        server=server,
        requests=len(records),
        loadavg=(loadavg[0], loadavg[1], loadavg[2]),
        client_first_token_ms=client,
        steps=steps,
        total=_step(("received", "first_token_written"), totals),
        unresolved=sorted(mark for mark, target in raw["probes"].items() if target is None),
        abandoned=int(raw["abandoned"]),
        hops_by_coroutine={
            name: round(count / max(1, len(raw["records"])), 2) for name, count in raw["steps_by_coroutine"].items()
        },
    )


def _step(key: tuple[str, str], deltas: list[list[int]]) -> TimelineStep:
    start, end = key
    phase = PHASES.get(key) or END_PHASES.get(end) or f"{start} -> {end}"

    def median_us(i: int) -> float:
        return round(statistics.median(d[i] for d in deltas) / 1000, 1)

    return TimelineStep(
        phase,
        start,
        end,
        len(deltas),
        median_us(0),
        median_us(1),
        median_us(2),
        statistics.median(d[3] for d in deltas),
    )


def table(result: TimelineResult) -> str:
    rows = [
        f"{result.server}: {result.requests} requests, client first token p50 "
        f"{result.client_first_token_ms.p50 or 0:.3f} ms, load average {result.loadavg[0]:.1f}",
        "",
        "| phase | from → to | wall µs | loop CPU µs | process CPU µs | hops |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for s in [*result.steps, result.total]:
        name = "**total**" if s is result.total else s.phase
        rows.append(
            f"| {name} | {s.start} → {s.end} | {s.wall_us:.1f} | {s.loop_cpu_us:.1f} | "
            f"{s.process_cpu_us:.1f} | {s.hops:g} |"
        )
    if result.unresolved:
        rows.append(f"\nno probe target found for: {', '.join(result.unresolved)}")
    hops = ", ".join(f"{name} {count:g}" for name, count in result.hops_by_coroutine.items())
    rows.append(f"\nhops per request by coroutine: {hops}")
    return "\n".join(rows)


def run(servers: Sequence[str], requests: int, warmup: int, pin: bool) -> list[TimelineResult]:
    cpus_stub, cpus_sut = (CPU_STUB, CPU_SUT) if pin and len(os.sched_getaffinity(0)) >= 2 else (None, None)
    workdir = Path(tempfile.mkdtemp(prefix="bench-timeline-"))
    load = [
        "--query",
        words(50, FAST_REPEAT),
        "--concurrency",
        "1",
        "--requests",
        str(requests),
        "--warmup",
        str(warmup),
        "--max-s",
        "120",
    ]
    stub = StubProc(["--mode", "echo", "--repeat", str(FAST_REPEAT)], cpus_stub)
    results: list[TimelineResult] = []
    try:
        for server in servers:
            out = workdir / f"{server}.json"
            log(f"timeline: {server}, {requests} requests")
            loadavg = os.getloadavg()
            proc = start_probed(server, out, stub.target, cpus_sut, workdir)
            try:
                client = Loadgen(["sse", "--url", proc.stream_url, *load], cpus_stub).result(300)
            finally:
                proc.stop()
            raw = json.loads(out.read_text(encoding="utf-8"))
            results.append(summarise(server, raw, warmup, Summary.from_json(client["first_token_ms"]), loadavg))
    finally:
        stub.stop()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.lab.timeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", default="bridge,peer", help="comma list of bridge, peer")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--pin", choices=("on", "off"), default="on")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    args = parser.parse_args(argv)
    results = run(
        [s.strip() for s in args.servers.split(",") if s.strip()], args.requests, args.warmup, args.pin == "on"
    )
    for result in results:
        print(table(result), end="\n\n")
    if args.out is not None:
        args.out.write_text(json.dumps([asdict(r) for r in results], indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
