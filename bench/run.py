"""``make bench``: bali-zero-bridge against direct gRPC and the obvious reference bridge.

Starts the stub(s), our bridge and the reference peer as separate processes on free loopback
ports, drives them with ``bench.loadgen`` (its own process, uvloop), and writes
``bench/results/report.json``, ``chart.png`` and ``table.md``, then prints the markdown table.

    python -m bench.run                 # the full run (several minutes)
    python -m bench.run --quick         # a ~10 s smoke run with tiny numbers (CI)
    python -m bench.run --only throughput,cancellation --pin off --out /tmp/bench

The scenarios and their goals are in ``bench/scenarios.py``. Nothing here fails on a number: the
report says which goals were met.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from bench.harness import Cores, Harness
from bench.loadgen import raise_fd_limit
from bench.procs import bridge_available
from bench.report import ROOT, chart, checks, git_commit, machine, markdown, thin_samples
from bench.results import Meta, Report, ScenarioFailure, Scenarios
from bench.scenarios import GROUP_OF, SCENARIOS
from bench.workload import Profile, log, quick_profile


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.run", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny numbers, ~10 s (CI smoke)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="report directory")
    parser.add_argument("--only", default="", help="comma-separated scenarios (default: all)")
    parser.add_argument(
        "--pin",
        choices=("on", "off"),
        default="on",
        help="pin the system under test to its own core (default on; see bench/README.md)",
    )
    parser.add_argument("--targets", default="bridge,direct,peer", help="comma-separated subset")
    parser.add_argument("--paced-levels", default="", help="override, e.g. 100,500,1000,2000,3000")
    args = parser.parse_args(argv)
    args.only = [x for x in args.only.split(",") if x] or list(SCENARIOS)
    unknown = set(args.only) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {sorted(unknown)}")
    return args


def run_scenarios(harness: Harness, names: list[str]) -> Scenarios:
    scenarios = Scenarios()
    for name in names:
        t0 = time.monotonic()
        try:
            result: object = SCENARIOS[name](harness)
        except Exception as exc:  # a failed scenario is reported, the others still run
            log(f"{name} failed: {type(exc).__name__}: {exc}")
            result = ScenarioFailure(f"{type(exc).__name__}: {exc}")
        setattr(scenarios, name, result)
        scenarios.elapsed_s[name] = time.monotonic() - t0
    return scenarios


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    profile: Profile = quick_profile() if args.quick else Profile()
    if args.paced_levels:
        profile.paced_levels = [int(x) for x in args.paced_levels.split(",")]
    targets = [t for t in args.targets.split(",") if t]
    if "bridge" in targets and not bridge_available():
        log("our bridge is not importable (python -m bridge); measuring direct gRPC and the peer only")
        targets.remove("bridge")
    raise_fd_limit()  # children inherit it: thousands of sockets in the bridge and the load generator
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    cores = Cores.plan(args.pin == "on")
    meta = Meta(
        date=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        git_commit=git_commit(),
        machine=machine(),
        quick=args.quick,
        pinned=cores.pinned,
        targets=targets,
        profile=asdict(profile),
        fd_limit=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        # Other work on the host skews every number: the load average says how quiet it was.
        loadavg_start=os.getloadavg(),
        cpus=asdict(cores),
    )
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        harness = Harness(profile, args.quick, cores, Path(tmp), targets)
        if args.quick:
            t0 = time.monotonic()
            harness.prestart(sorted({GROUP_OF[n] for n in args.only}))
            log(f"started {len(harness.kept)} process groups in {time.monotonic() - t0:.1f} s")
        try:
            scenarios = run_scenarios(harness, args.only)
        finally:
            harness.stop_all()
    meta.elapsed_s = time.monotonic() - started
    meta.loadavg_end = os.getloadavg()
    report = Report(meta, scenarios, checks(scenarios))
    try:
        chart(report, args.out / "chart.png")
    except Exception as exc:  # the JSON report matters more than the picture
        log(f"chart failed: {type(exc).__name__}: {exc}")
    thin_samples(scenarios)
    (args.out / "report.json").write_text(json.dumps(asdict(report), indent=1, default=str) + "\n")
    table = markdown(report)
    (args.out / "table.md").write_text(table + "\n")
    print(table)
    log(f"wrote {args.out / 'report.json'} and {args.out / 'chart.png'} in {meta.elapsed_s:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
