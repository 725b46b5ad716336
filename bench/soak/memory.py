"""The bridge's memory during a soak: RSS split into anonymous and file-backed pages, the slope per
stream and per 10 minutes, the memtrace probes, and the RSS chart."""

from __future__ import annotations

import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bzb_shared.fit import least_squares_slope


def memory_split_mib(pid: int) -> tuple[float, float, float]:
    """(resident, anonymous, file-backed) MiB of ``pid``, all from one read of ``/proc/PID/smaps_rollup``
    (a second read for the total would be a moment later and need not add up).

    Why split: anonymous memory is the heap (Python objects, grpc core, allocator arenas) and is
    what a leak grows; file-backed pages (shared libraries, SQLite's mapped WAL index) are
    clean or shared, reclaimable by the kernel, and grow as the audit store is touched.
    """
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            name, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB":
                fields[name] = int(parts[0])
    anonymous = fields.get("Anonymous", 0)
    resident = fields.get("Rss", 0)
    return round(resident / 1024, 2), round(anonymous / 1024, 2), round((resident - anonymous) / 1024, 2)


def memtrace_growth(probes: Path, at_s: Sequence[float], failures: list[str]) -> dict[str, Any]:
    """pymalloc's arenas and blocks per probe, and with tracemalloc the lines that grew between the
    last two snapshots."""
    from bench.lab.memtrace import growth, load_snapshot, pymalloc_summary, total_kib

    def numbered(pattern: str) -> list[Path]:
        return sorted(probes.glob(pattern), key=lambda p: int(p.stem.split("-")[1]))

    stats, snapshots = numbered("pymalloc-*.txt"), numbered("snapshot-*.tracemalloc")
    if max(len(stats), len(snapshots)) < 2:
        failures.append(f"memtrace: {len(stats) + len(snapshots)} probe(s) taken, 2 needed (run longer)")
        return {}
    report: dict[str, Any] = {"at_s": list(at_s)}
    if stats:
        report["pymalloc"] = [pymalloc_summary(p) for p in stats]
    if snapshots:
        last_two: list[tracemalloc.Snapshot] = []  # each snapshot is loaded once; only the last two are kept
        report["traced_kib"] = []
        for path in snapshots:
            last_two = [*last_two[-1:], load_snapshot(path)]
            report["traced_kib"].append(total_kib(last_two[-1]))
        if len(last_two) == 2:
            report["top_growth"] = growth(last_two[0], last_two[1])
    return report


def window_means(timeline: Sequence[Sequence[float]], column: int, width_s: float) -> list[float]:
    """Mean of ``column`` per consecutive ``width_s`` window: a plateau shows as equal means."""
    buckets: dict[int, list[float]] = {}
    for row in timeline:
        if len(row) > column:
            buckets.setdefault(int(row[0] // width_s), []).append(row[column])
    return [round(sum(v) / len(v), 2) for _, v in sorted(buckets.items())]


def rss_slope(timeline: Sequence[Sequence[float]], traffic_s: float) -> dict[str, Any]:
    """RSS growth after the warm-up: per stream started and per 10 minutes, by linear fit.

    The first third of the run (at least 30 s) is left out: pools, arenas and bounded caches fill
    there. For long runs the fit covers the last 20 minutes, the window the plateau is judged on.
    Samples after ``traffic_s`` (the last streams draining) are left out too.
    """
    timeline = [row for row in timeline if row[0] <= traffic_s]
    if len(timeline) < 4:
        return {}
    end = timeline[-1][0]
    start = max(end / 3, 30.0, end - 1200.0) if end > 90 else end / 3
    window = [row for row in timeline if row[0] >= start]
    if len(window) < 3:
        return {}
    secs = [row[0] for row in window]
    rss = [row[2] for row in window]
    opened = [row[3] for row in window]
    slope: dict[str, Any] = {
        "from_s": window[0][0],
        "to_s": window[-1][0],
        "points": len(window),
        "streams": int(opened[-1] - opened[0]),
        "kib_per_stream": round(least_squares_slope(opened, rss) * 1024, 4),
        "mib_per_10min": round(least_squares_slope(secs, rss) * 600, 3),
        "rss_first_mib": rss[0],
        "rss_last_mib": rss[-1],
        # Means per 5 minutes over the whole run: growth that slows down window after window is a
        # cache filling up; a leak adds the same amount to every window.
        "rss_means_per_5min_mib": window_means(timeline, 2, 300.0),
    }
    if all(len(row) >= 6 for row in window):
        slope["anon_mib_per_10min"] = round(least_squares_slope(secs, [row[4] for row in window]) * 600, 3)
        slope["file_mib_per_10min"] = round(least_squares_slope(secs, [row[5] for row in window]) * 600, 3)
        slope["anon_means_per_5min_mib"] = window_means(timeline, 4, 300.0)
    return slope


# ----------------------------------------------------------------------------------------- main


def chart(summary: dict[str, Any], path: Path) -> None:
    """RSS of the bridge over the run, and over streams started with the fitted slope window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = summary["resources"]
    rows = res["timeline"]
    minutes = [row[0] / 60 for row in rows]
    rss = [row[2] for row in rows]
    opened = [row[3] / 1000 for row in rows]
    fig, (by_time, by_streams) = plt.subplots(1, 2, figsize=(12, 4.5))
    by_time.plot(minutes, rss, color="tab:blue", label="bridge RSS")
    if rows and len(rows[0]) >= 6:
        by_time.plot(minutes, [row[4] for row in rows], color="tab:purple", linewidth=0.8, label="anonymous")
    by_time.axhline(res["rss_before_mib"], color="grey", linestyle=":", label="baseline after warm-up")
    by_time.axhline(res["rss_after_mib"], color="tab:green", linestyle="--", label="after traffic stopped")
    slope = summary.get("rss_slope") or {}
    if slope:
        by_time.axvspan(
            slope["from_s"] / 60,
            slope["to_s"] / 60,
            color="tab:orange",
            alpha=0.12,
            label=f"fit window: {slope['mib_per_10min']:+.2f} MiB / 10 min",
        )
    by_time.set_xlabel("minutes of traffic")
    by_time.set_ylabel("RSS (MiB)")
    by_time.legend(loc="lower right", fontsize=8)
    by_streams.plot(opened, rss, color="tab:blue")
    by_streams.set_xlabel("streams started (thousands)")
    by_streams.set_ylabel("RSS (MiB)")
    if slope:
        by_streams.set_title(f"{slope['kib_per_stream'] * 1024:+.1f} bytes per stream (fit window)", fontsize=10)
    fig.suptitle(
        f"bench.soak: {summary['concurrency']} concurrent streams, {summary['duration_s']:g} s, "
        f"load average {summary.get('cpu_s', {}).get('load_average_1m', '?')}",
        fontsize=11,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
