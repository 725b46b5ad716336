"""Run the bridge with memory probes, dumping them on each SIGUSR2 (bench-only).

    python -m bench.lab.memtrace DIR [FRAMES] -- --port 0      # then: kill -USR2 <pid>

On each signal, after a full garbage collection (garbage waiting for the cycle collector is not
growth): ``DIR/pymalloc-<n>.txt``, CPython's small-object allocator statistics (arenas held,
bytes in used and in free blocks), or with FRAMES > 0 ``DIR/snapshot-<n>.tracemalloc`` instead
(tracing hooks the allocator, and CPython then has no pymalloc statistics to print).

Why both: tracemalloc sees Python objects but not the allocator around them. A process whose
traced memory stays flat can still grow when pymalloc's 1 MiB arenas stay partly used (an arena
is returned only once empty) or native code allocates (for that, see heaptrack in
bench/README.md). Why a wrapper and not a flag of the bridge: tracing every allocation roughly
halves the bridge's throughput, and production code should carry no diagnosis switches. Why a
signal: the probes must run inside the process between two Python steps; attaching a debugger
and calling into the interpreter at an arbitrary instruction stalled the bridge for minutes (the
stopped thread may hold the allocator's lock).

``bench.soak --memtrace-at`` signals at chosen minutes and reports the growth between the last two.
"""

from __future__ import annotations

import gc
import itertools
import os
import signal
import sys
import tracemalloc
from pathlib import Path
from types import FrameType
from typing import Any


def install(out_dir: Path, frames: int) -> None:
    """Dump the probes into ``out_dir`` on every SIGUSR2; trace allocations when ``frames`` > 0."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if frames > 0:
        tracemalloc.start(frames)
    counter = itertools.count(1)

    def dump(_signum: int, _frame: FrameType | None) -> None:
        gc.collect()
        n = next(counter)
        if tracemalloc.is_tracing():
            path = out_dir / f"snapshot-{n}.tracemalloc"
            tracemalloc.take_snapshot().dump(str(path.with_suffix(".partial")))
            path.with_suffix(".partial").rename(path)  # a reader never sees half a snapshot
        else:  # tracemalloc hooks the allocator: CPython then prints no pymalloc statistics
            _write_pymalloc_stats(out_dir / f"pymalloc-{n}.txt")

    signal.signal(signal.SIGUSR2, dump)


def _write_pymalloc_stats(path: Path) -> None:
    """``sys._debugmallocstats()`` writes to the C stderr: point fd 2 at ``path`` meanwhile."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path.with_suffix(".partial"), "wb") as out:
            os.dup2(out.fileno(), 2)
            sys._debugmallocstats()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    path.with_suffix(".partial").rename(path)


def pymalloc_summary(path: Path) -> dict[str, int]:
    """Arenas held and bytes in used / free blocks, from a ``pymalloc-<n>.txt``."""
    wanted = {
        "# arenas allocated current": "arenas",
        "# bytes in allocated blocks": "used_bytes",
        "# bytes in available blocks": "free_bytes",
    }
    summary: dict[str, int] = {}
    for line in path.read_text(errors="replace").splitlines():
        name, _, value = line.partition("=")
        key = wanted.get(name.strip())
        if key is not None and key not in summary:
            summary[key] = int(value.strip().replace(",", ""))
    return summary


def load_snapshot(path: Path) -> tracemalloc.Snapshot:
    """A dumped snapshot, read once: a long soak's snapshots take seconds each to load."""
    return tracemalloc.Snapshot.load(str(path))


def growth(older: tracemalloc.Snapshot, newer: tracemalloc.Snapshot, top: int = 15) -> list[dict[str, Any]]:
    """The ``top`` source lines whose traced memory grew most from ``older`` to ``newer``."""
    ignore = [
        tracemalloc.Filter(False, tracemalloc.__file__),
        tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
    ]
    before = older.filter_traces(ignore)
    after = newer.filter_traces(ignore)
    rows: list[dict[str, Any]] = []
    for stat in after.compare_to(before, "lineno")[:top]:
        frame = stat.traceback[0]
        rows.append(
            {
                "where": f"{frame.filename}:{frame.lineno}",
                "size_diff_kib": round(stat.size_diff / 1024, 1),
                "count_diff": stat.count_diff,
                "size_kib": round(stat.size / 1024, 1),
            }
        )
    return rows


def total_kib(snapshot: tracemalloc.Snapshot) -> float:
    return round(sum(s.size for s in snapshot.statistics("filename")) / 1024, 1)


def main(argv: list[str]) -> int:
    if "--" not in argv or argv.index("--") < 1:
        print("usage: python -m bench.lab.memtrace DIR [FRAMES] -- BRIDGE-ARGS...", file=sys.stderr)
        return 2
    split = argv.index("--")
    own, rest = argv[:split], argv[split + 1 :]
    install(Path(own[0]), int(own[1]) if len(own) > 1 else 1)
    from bridge.cli import main as bridge_main

    return bridge_main(rest)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
