"""Turns a benchmark report into verdicts, a markdown table and a chart."""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from bench.results import (
    CancelResult,
    Check,
    LatencyResult,
    Machine,
    PacedResult,
    Report,
    ScenarioFailure,
    Scenarios,
    ThroughputResult,
    div,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes

ROOT = Path(__file__).resolve().parents[1]
TARGET_ORDER = ("bridge", "direct", "peer")
NAMES = {"bridge": "bali-zero-bridge", "direct": "direct gRPC", "peer": "reference peer"}
COLOURS = {"bridge": "tab:blue", "direct": "tab:green", "peer": "tab:red"}
T = TypeVar("T")


def measured(result: T | ScenarioFailure | None) -> T | None:
    """A scenario's result, or None when it was not run or failed."""
    return None if result is None or isinstance(result, ScenarioFailure) else result


# ------------------------------------------------------------------------------------------ verdicts


def checks(s: Scenarios) -> list[Check]:
    """Every README target with its measured value (None when it could not be measured)."""
    out: list[Check] = []

    def add(name: str, value: float | None, op: str, limit: float, unit: str, note: str = "") -> None:
        met = None if value is None else (value <= limit if op == "<=" else value >= limit)
        out.append(Check(name, value, f"{op} {limit:g}{unit}", met, note))

    latency = measured(s.first_token_latency)
    if latency is not None and latency.added_p50_ms:
        b, p = latency.added_p50_ms.get("bridge"), latency.added_p50_ms.get("peer")
        add(
            "added first-token latency p50, bridge / peer",
            div(b, p),
            "<=",
            0.5,
            "x",
            f"bridge +{fmt(b)} ms, peer +{fmt(p)} ms over direct gRPC",
        )
    tp = measured(s.throughput)
    tb = tp.targets["bridge"].tokens_per_s if tp and "bridge" in tp.targets else None
    td = tp.targets["direct"].tokens_per_s if tp and "direct" in tp.targets else None
    add("throughput, bridge / direct gRPC", div(tb, td), ">=", 0.7, "x", f"{fmt(tb, 0)} vs {fmt(td, 0)} tokens/s")
    paced = measured(s.paced_concurrency)
    if paced is not None:
        _paced_checks(paced, add, out)
    idle = measured(s.idle_connections)
    add(
        "idle RSS per stream (bridge)",
        idle.targets["bridge"].rss_per_stream_kib if idle and "bridge" in idle.targets else None,
        "<=",
        30,
        " KiB",
    )
    cancel = measured(s.cancellation)
    add(
        "cancellation p99 (bridge)",
        cancel.targets["bridge"].close_to_cancelled_ms.p99 if cancel and "bridge" in cancel.targets else None,
        "<=",
        20,
        " ms",
    )
    slow = measured(s.slow_reader)
    add(
        "slow reader RSS growth (bridge)",
        slow.targets["bridge"].rss_growth_mib if slow and "bridge" in slow.targets else None,
        "<=",
        2,
        " MiB",
    )
    return out


def _paced_checks(paced: PacedResult, add: Callable[..., None], out: list[Check]) -> None:
    held = {t: row.max_paced_streams for t, row in paced.targets.items()}
    bound = {t: row.knee_is_lower_bound for t, row in paced.targets.items()}

    def shown(target: str) -> str:
        return f"{held.get(target)}{'+' if bound.get(target) else ''}"

    for other, limit in (("direct", 0.8), ("peer", 1.5)):
        ratio = div(held.get("bridge"), held.get(other))
        label = "direct gRPC" if other == "direct" else "peer"
        add(
            f"paced streams held, bridge / {label}",
            ratio,
            ">=",
            limit,
            "x",
            f"{shown('bridge')} vs {shown(other)} streams with p99 gap <= 2x pacing",
        )
        # A ratio of two lower bounds says nothing; bridge-bounded vs other-measured is a lower bound too.
        last = out[-1]
        if last.met is False and bound.get("bridge"):
            out[-1] = Check(
                last.name,
                last.value,
                last.target,
                None,
                last.note + "; inconclusive: the bridge held every level, add higher --paced-levels",
            )


# --------------------------------------------------------------------------------------------- table


def fmt(value: object, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def markdown(report: Report) -> str:
    m = report.meta
    s = report.scenarios
    end_load = m.loadavg_end[0] if m.loadavg_end else float("nan")
    lines = [
        f"Benchmark of {m.git_commit} on {m.date}: {m.machine.nproc} x {m.machine.cpu_model}, "
        f"Python {m.machine.python}, {'quick' if m.quick else 'full'} run, pinning {'on' if m.pinned else 'off'}, "
        f"load average {m.loadavg_start[0]:.1f} at start and {end_load:.1f} at the end "
        "(other work on the host skews results).",
        "",
        "| measure | bridge | direct gRPC | reference peer |",
        "|---|---:|---:|---:|",
    ]

    def row(label: str, values: Mapping[str, object], digits: int = 2) -> None:
        cells = [fmt(values[t], digits) if values.get(t) is not None else "–" for t in TARGET_ORDER]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    latency = measured(s.first_token_latency)
    if latency is not None:
        for q in ("p50", "p95", "p99"):
            row(
                f"first token ms {q} (1 client, 50 tokens)",
                {t: getattr(d.first_token_ms, q) for t, d in latency.targets.items()},
            )
        if latency.added_p50_ms:

            def added(t: str) -> str:
                return f"{fmt(latency.added_p50_ms.get(t))} / {fmt(latency.added_p99_ms.get(t))}"

            lines.append(f"| added first-token ms p50 / p99 over gRPC | {added('bridge')} | 0 | {added('peer')} |")
    tp = measured(s.throughput)
    if tp is not None:
        _throughput_rows(tp, row)
    paced = measured(s.paced_concurrency)
    if paced is not None:
        for i, level in enumerate(paced.levels):
            row(
                f"paced p99 gap ms @ {level} streams",
                {t: d.levels[i].gap_ms.p99 for t, d in paced.targets.items() if i < len(d.levels)},
                1,
            )
        row(
            "paced streams held (p99 gap <= 2x pacing)",
            {t: f"{d.max_paced_streams}{'+' if d.knee_is_lower_bound else ''}" for t, d in paced.targets.items()},
        )
    idle = measured(s.idle_connections)
    if idle is not None:
        row(
            "idle RSS KiB per stream (direct: the gRPC client's own)",
            {t: d.rss_per_stream_kib for t, d in idle.targets.items()},
            1,
        )
    cancel = measured(s.cancellation)
    if cancel is not None:
        for q in ("p50", "p99"):
            row(
                f"close -> upstream cancelled ms {q}",
                {t: getattr(d.close_to_cancelled_ms, q) for t, d in cancel.targets.items()},
            )
    slow = measured(s.slow_reader)
    if slow is not None:
        row("slow reader RSS growth MiB", {t: d.rss_growth_mib for t, d in slow.targets.items()}, 3)
    lines += ["", "| target | measured | goal | met |", "|---|---:|---:|:-:|"]
    for c in report.checks:
        met = {True: "yes", False: "**no**", None: "n/a"}[c.met]
        name = f"{c.name} ({c.note})" if c.note else c.name
        lines.append(f"| {name} | {fmt(c.value)} | {c.target} | {met} |")
    return "\n".join(lines)


def _throughput_rows(tp: ThroughputResult, row: Callable[..., None]) -> None:
    def of(attr: str) -> dict[str, object]:
        return {t: getattr(d, attr) for t, d in tp.targets.items()}

    row("throughput tokens/s (16 clients)", of("tokens_per_s"), 0)
    row("CPU s per 1 000 tokens (direct: the gRPC client itself)", of("cpu_s_per_1k_tokens"), 4)
    row("load generator CPU share (throughput)", of("loadgen_cpu_utilisation"))
    # The stub shares core 0 with the HTTP load generator: their sum near 1.0 means core 0, not the
    # system under test, capped that run (the direct client has core 1 and needs no HTTP client).
    row("stub CPU share (throughput)", of("stub_cpu_share"))
    row("core 0 ceiling tokens/s: 1 / (stub + HTTP load generator CPU per token)", of("core0_ceiling_tokens_per_s"), 0)


# --------------------------------------------------------------------------------------------- chart


def chart(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report.scenarios
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))

    def cdf(ax: Axes, samples: dict[str, list[float]]) -> None:
        for target, values in samples.items():
            ordered = sorted(values)
            if ordered:
                ax.plot(
                    ordered,
                    [i / len(ordered) for i in range(1, len(ordered) + 1)],
                    label=NAMES[target],
                    color=COLOURS[target],
                )

    ax = axes[0][0]
    latency = measured(s.first_token_latency)
    cdf(ax, {t: d.samples_ms for t, d in latency.targets.items()} if latency else {})
    ax.set_title("First-token latency (1 client, 50 tokens), CDF")
    ax.set_xlabel("ms from request to first token")
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax = axes[0][1]
    paced = measured(s.paced_concurrency)
    if paced is not None:
        for target, data in paced.targets.items():
            ax.plot(
                [r.streams for r in data.levels],
                [r.gap_ms.p99 or 0 for r in data.levels],
                marker="o",
                label=NAMES[target],
                color=COLOURS[target],
            )
        ax.axhline(paced.knee_p99_gap_ms, ls="--", color="grey", label="2 x pacing")
        ax.axhline(paced.pacing_ms, ls=":", color="grey", label="pacing")
    ax.set_title("Paced streams: p99 inter-token gap vs concurrency (the knee)")
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("p99 gap, ms")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax = axes[1][0]
    tp = measured(s.throughput)
    if tp is not None:
        keys = list(tp.targets)
        values = [tp.targets[k].tokens_per_s for k in keys]
        ax.bar([NAMES[k] for k in keys], values, color=[COLOURS[k] for k in keys])
        for i, value in enumerate(values):
            ax.text(i, value, f"{value:,.0f}", ha="center", va="bottom")
    ax.set_title("Throughput, 16 clients x 1 000-token streams (tokens/s)")
    ax.grid(alpha=0.3, axis="y")
    ax = axes[1][1]
    cancel = measured(s.cancellation)
    cdf(ax, {t: d.samples_ms for t, d in cancel.targets.items()} if cancel else {})
    ax.axvline(20, ls="--", color="grey", label="20 ms goal")
    ax.set_title("Client close -> upstream cancelled, CDF")
    ax.set_xlabel("ms")
    ax.grid(alpha=0.3)
    ax.legend()
    m = report.meta
    fig.suptitle(f"bali-zero-bridge {m.git_commit} — {m.date} — {m.machine.nproc} x {m.machine.cpu_model}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def thin_samples(s: Scenarios, keep: int = 5000) -> None:
    """Keep raw samples out of the JSON when they would make it large (the chart already used them)."""
    for result in (measured(s.first_token_latency), measured(s.cancellation)):
        if isinstance(result, LatencyResult | CancelResult):
            for data in result.targets.values():
                if len(data.samples_ms) > keep:
                    data.samples_ms = data.samples_ms[:: len(data.samples_ms) // keep + 1]


# ------------------------------------------------------------------------------------- the machine


def machine() -> Machine:
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return Machine(os.cpu_count(), len(os.sched_getaffinity(0)), model, platform.release(), platform.python_version())


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "uncommitted"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
