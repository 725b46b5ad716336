"""A CPU budget for a process: a Linux cgroup with a CFS quota (``cpu.max`` or ``cpu.cfs_quota_us``).

``bench.workers --cores-per-worker 0.4`` gives each bridge worker this budget, so a scaling run on
a small host measures what a worker does with the CPU it is given, while the stub and the load
generator (which have no budget) keep the rest of the machine. Pinning cannot express that on two
cores: a worker needs a fraction of a core, and the other processes need the remainder of both.

The period is short (10 ms): a worker that spent its quota early waits at most the rest of one
period, far below the inter-token target, where the kernel's default period (100 ms) would add
waits of tens of milliseconds to the gaps being measured.

Needs root (or a delegated cgroup). A host without a writable cpu controller is an error with one
line, never a run without the budget that would report figures of a different experiment.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

PERIOD_US = 10_000
V2_ROOT = Path("/sys/fs/cgroup")
V1_ROOT = Path("/sys/fs/cgroup/cpu")


class QuotaUnavailable(RuntimeError):
    """No writable cpu controller on this host."""


class CpuQuota:
    """One cgroup holding processes to ``cores`` CPUs (``0.5``: half a core) over each period."""

    def __init__(self, name: str, cores: float) -> None:
        if cores <= 0:
            raise ValueError("cores must be positive")
        quota_us = max(1000, round(cores * PERIOD_US))
        self.path = self._create(f"bzb-bench-{os.getpid()}-{name}", quota_us)

    @staticmethod
    def _create(name: str, quota_us: int) -> Path:
        if (V2_ROOT / "cgroup.controllers").exists() and "cpu" in (V2_ROOT / "cgroup.controllers").read_text():
            path = V2_ROOT / name
            try:
                (V2_ROOT / "cgroup.subtree_control").write_text("+cpu")
                path.mkdir()
                (path / "cpu.max").write_text(f"{quota_us} {PERIOD_US}")
            except OSError as exc:
                raise QuotaUnavailable(f"cannot set a CPU quota under {V2_ROOT}: {exc}") from exc
            return path
        if (V1_ROOT / "cpu.cfs_quota_us").exists():
            path = V1_ROOT / name
            try:
                path.mkdir()
                (path / "cpu.cfs_period_us").write_text(str(PERIOD_US))
                (path / "cpu.cfs_quota_us").write_text(str(quota_us))
            except OSError as exc:
                raise QuotaUnavailable(f"cannot set a CPU quota under {V1_ROOT}: {exc}") from exc
            return path
        raise QuotaUnavailable("no cgroup cpu controller (cgroup v2 cpu.max or v1 cpu.cfs_quota_us) on this host")

    def add(self, pid: int) -> None:
        """Move ``pid`` and all its threads (present and future) into the budget."""
        (self.path / "cgroup.procs").write_text(str(pid))

    def throttled_s(self) -> float:
        """Time the budget held its processes back so far."""
        for line in (self.path / "cpu.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "throttled_usec":
                return int(value) / 1e6
            if key == "throttled_time":
                return int(value) / 1e9
        return 0.0

    def close(self) -> None:
        """Move what is left back to the root group and remove the cgroup."""
        root = self.path.parent
        with contextlib.suppress(OSError):
            for pid in (self.path / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    (root / "cgroup.procs").write_text(pid)
        with contextlib.suppress(OSError):
            self.path.rmdir()
