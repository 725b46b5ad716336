"""Smoke run of the soak test (bench/soak/): a short, small run whose accounting must all hold.

Every token delivered is checked by index across resumes, every upstream stream must end exactly
once with the outcome the client saw, the bridge must be idle with fds/RSS back near the baseline,
and the audit trail must verify and count exactly what the soak observed.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.processes import ROOT, base_env


def run_soak(tmp_path: Path, *args: str) -> tuple[dict[str, Any], subprocess.CompletedProcess[str]]:
    """An 8-second soak with ``args``; its JSON summary and the finished process."""
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--duration", "8", *args, "--out", str(out)],
        cwd=ROOT,
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert out.is_file(), proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(out.read_text()), proc


@pytest.mark.timeout(120)
def test_soak_smoke_accounts_for_everything(tmp_path: Path) -> None:
    summary, proc = run_soak(tmp_path, "--concurrency", "50")
    assert proc.returncode == 0, json.dumps(summary["failures"], indent=1) + proc.stderr[-2000:]
    assert summary["ok"] is True and summary["failure_count"] == 0

    streams = summary["streams"]
    assert streams["started"] > 0 and streams["failed"] == 0
    assert streams["completed"] + streams["cancelled"] == streams["started"]
    assert summary["tokens"] > 0
    assert summary["resumes"] > 0  # some streams were continued with Last-Event-ID
    assert summary["expired"] > 0  # and some resumed too late (STREAM_EXPIRED)
    assert streams["deleted"] > 0 and streams["by_plan"].get("abandon", 0) > 0
    assert summary["rate_limited_429"] > 0  # the hammer users went past RATE_LIMIT

    stats = summary["stream_stats_after"]
    assert stats["open_streams"] == 0 and stats["sessions_held"] == 0 and stats["open_connections_by_cap"] == 0

    stub = summary["stub"]
    assert stub["duplicates"] == stub["missing"] == stub["unknown"] == stub["outcome_mismatches"] == 0

    audit = summary["audit"]
    assert audit["verify"].startswith("audit chain OK")
    assert audit["per_stream_mismatches"] == 0
    for name, want in audit["expected"].items():
        assert audit["counts"].get(name, 0) == want, name
    assert audit["counts"]["rate_limited"] == summary["rate_limited_429"]

    res = summary["resources"]
    assert res["returned"] is True
    assert res["fds_after"] <= res["fds_before"] + 8
    # Every sample splits RSS into anonymous (heap: what a leak grows) and file-backed memory.
    with (tmp_path / "soak.timeline.csv").open() as samples:
        rows = list(csv.DictReader(samples))
    assert rows
    assert all(float(row["anonymous_mib"]) + float(row["file_backed_mib"]) <= float(row["rss_mib"]) + 8 for row in rows)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("frames", ["0", "1"])
def test_soak_memtrace_probes_the_bridge_memory(tmp_path: Path, frames: str) -> None:
    """The diagnosis mode: the bridge runs under bench.lab.memtrace and dumps two probes on signal:
    pymalloc's arenas, or with tracemalloc the source lines that grew."""
    summary, _ = run_soak(tmp_path, "--concurrency", "20", "--memtrace-at", "0.03,0.1", "--memtrace-frames", frames)
    probes = summary["memtrace"]
    if frames == "0":
        assert [p["arenas"] > 0 and p["used_bytes"] > 0 for p in probes["pymalloc"]] == [True, True]
    else:
        assert len(probes["traced_kib"]) == 2 and min(probes["traced_kib"]) > 1000  # the bridge's own modules
        assert probes["top_growth"] and all(":" in row["where"] for row in probes["top_growth"])
