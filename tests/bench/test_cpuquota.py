"""The bench's CPU budget (bench/cpuquota.py) holds a busy process to its share of a core.

Needs a writable cgroup cpu controller (root here); elsewhere it is skipped, and in CI a missing
controller is a failure, as for every real component the tests need.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest

from bench.cpuquota import CpuQuota, QuotaUnavailable

BUSY = "while True: pass"


def test_a_busy_process_under_a_fifth_of_a_core_uses_about_a_fifth() -> None:
    try:
        quota = CpuQuota("selftest", 0.2)
    except QuotaUnavailable as exc:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(str(exc))
    busy = subprocess.Popen([sys.executable, "-c", BUSY])
    try:
        quota.add(busy.pid)
        process = psutil.Process(busy.pid)
        before, started = sum(process.cpu_times()[:2]), time.monotonic()
        time.sleep(1.0)  # the interval measured, not synchronisation
        used = (sum(process.cpu_times()[:2]) - before) / (time.monotonic() - started)
        assert 0.05 < used < 0.3, used
        assert quota.throttled_s() > 0.3
    finally:
        busy.kill()
        busy.wait()
        quota.close()
    assert not quota.path.exists()
