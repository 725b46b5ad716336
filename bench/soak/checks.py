"""The soak's accounting: every stream, every upstream stream and every audit record checked
against what the client saw and did."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil

from bench.procs import StubProc
from bench.soak.traffic import LStream
from bzb_shared.childproc import ROOT, base_env


def poll(predicate: Callable[[], bool], timeout: float, interval: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def stub_end_lines(stub: StubProc) -> list[dict[str, Any]]:
    lines = stub.lines_from(0)
    return [json.loads(x) for x in lines if x.startswith('{"event":"stream_end"')]


def expected_outcome(s: LStream) -> str:
    """The bridge/stub outcome this stream must have had, from what the client saw and did."""
    if s.done:
        return "completed"
    if s.error_code is not None and not s.expired and s.error_code != "STREAM_CANCELLED":
        return "error"
    return "cancelled"  # disconnected, expired, or stopped by DELETE (which ends with STREAM_CANCELLED)


def check_streams(streams: Sequence[LStream], failures: list[str]) -> None:
    for s in streams:
        for why in s.failures:
            failures.append(f"{s.lid} ({s.plan.kind}): {why}")
        if not s.started:
            continue
        if s.tokens != s.expected[: len(s.tokens)]:
            failures.append(f"{s.lid}: tokens are not a prefix of the expected list")
        kind = s.plan.kind
        if kind in ("complete", "resume", "hammer") and not s.done:
            error = f"{s.error_code}: {s.error_message!r} on connection {s.connections}" if s.error_code else None
            failures.append(
                f"{s.lid} ({kind}): no done (error {error}; {len(s.tokens)}/{s.plan.n} tokens, cuts {s.plan.cuts}, "
                f"pauses {[round(p, 2) for p in s.plan.pauses]}, away (sent, answered) {s.away})"
            )
        if kind == "late" and not s.expired:
            failures.append(
                f"{s.lid} (late): resume after the grace window was not STREAM_EXPIRED "
                f"(done={s.done}, error={s.error_code}, {len(s.tokens)}/{s.plan.n} tokens)"
            )
        if kind == "delete" and not s.deleted:
            failures.append(f"{s.lid} (delete): never stopped")


def check_stub(streams: Sequence[LStream], ends: list[dict[str, Any]], failures: list[str]) -> dict[str, Any]:
    """One ``stream_end`` per started stream, with the outcome the client saw.

    A stream the bridge cancelled may have *completed* at the stub, with every token sent: the
    stub counts a stream complete once its last message is written, and the bridge's pump can be
    that far behind (gRPC buffers up to the flow-control window) when the stop or the grace
    expiry cancels it. The reverse (the stub cancelled, the client got ``done``) is never allowed.
    """
    by_id: dict[str, list[dict[str, Any]]] = {}
    for end in ends:
        by_id.setdefault(end["request_id"], []).append(end)
    started = {s.lid: s for s in streams if s.started}
    duplicates = [rid for rid, items in by_id.items() if len(items) > 1]
    unknown = [rid for rid in by_id if rid not in started]
    missing = [rid for rid in started if rid not in by_id]
    mismatched = finished_first = 0
    for rid, s in started.items():
        found = by_id.get(rid)
        if not found:
            continue
        end, want = found[0], expected_outcome(s)
        ok = end["outcome"] == want or (want == "error" and end["outcome"] == "failed")
        if want == "cancelled" and end["outcome"] == "completed":
            ok = end["tokens_sent"] == s.plan.n
            finished_first += ok
        elif want == "completed":
            ok = ok and end["tokens_sent"] == s.plan.n
        elif end["tokens_sent"] < len(s.tokens):
            ok = False
        if not ok:
            mismatched += 1
            if mismatched <= 10:
                failures.append(
                    f"stub end of {rid} ({s.plan.kind}): {end} but the client saw {want}, {len(s.tokens)} tokens"
                )
    for name, items in (
        ("ended more than once", duplicates),
        ("ended but never started", unknown),
        ("started but never ended", missing),
    ):
        if items:
            failures.append(f"stub: {len(items)} stream(s) {name}, e.g. {items[:5]}")
    return {
        "stream_ends": len(ends),
        "duplicates": len(duplicates),
        "unknown": len(unknown),
        "missing": len(missing),
        "outcome_mismatches": mismatched,
        "completed_upstream_before_bridge_cancel": finished_first,
        "outcomes": dict(Counter(e["outcome"] for e in ends)),
    }


def check_audit(streams: Sequence[LStream], rejected_429: int, audit_db: Path, failures: list[str]) -> dict[str, Any]:
    env = base_env({"AUDIT_DB": str(audit_db)})
    argv = [sys.executable, "-m", "bridge", "audit"]
    verify = subprocess.run([*argv, "verify"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if verify.returncode != 0:
        failures.append(f"audit verify exited {verify.returncode}: {verify.stdout.strip()} {verify.stderr[-500:]}")
    export = subprocess.run([*argv, "export"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if export.returncode != 0:
        failures.append(f"audit export exited {export.returncode}: {export.stderr[-500:]}")
    records = [json.loads(line) for line in export.stdout.splitlines() if line.strip()]
    counts: Counter[str] = Counter()
    for record in records:  # a security event stands for ``count`` refusals (folded per window)
        counts[record["event_type"]] += int(record.get("count", 1))
    started = [s for s in streams if s.started]
    observed = Counter(expected_outcome(s) for s in started)
    expect = {
        "stream_started": len(started),
        "stream_completed": observed["completed"],
        "stream_cancelled": observed["cancelled"],
        "stream_failed": observed["error"],
        "rate_limited": rejected_429,
    }
    for name, want in expect.items():
        if counts.get(name, 0) != want:
            failures.append(f"audit: {counts.get(name, 0)} {name} records, the soak observed {want}")
    # Per stream: exactly one start and one end record, with the outcome the client saw.
    ends_by_id: dict[str, list[str]] = {}
    starts_by_id: Counter[str] = Counter()
    for r in records:
        if r["event_type"] == "stream_started":
            starts_by_id[r["request_id"]] += 1
        elif r["event_type"] in ("stream_completed", "stream_cancelled", "stream_failed"):
            ends_by_id.setdefault(r["request_id"], []).append(r["event_type"])
    wrong = 0
    names = {"completed": "stream_completed", "cancelled": "stream_cancelled", "error": "stream_failed"}
    for s in started:
        if starts_by_id.get(s.lid) != 1 or ends_by_id.get(s.lid) != [names[expected_outcome(s)]]:
            wrong += 1
            if wrong <= 5:
                failures.append(
                    f"audit records of {s.lid}: {starts_by_id.get(s.lid)} start(s), "
                    f"ends {ends_by_id.get(s.lid)}, the client saw {expected_outcome(s)}"
                )
    return {
        "verify": verify.stdout.strip(),
        "records": len(records),
        "counts": dict(counts),
        "expected": expect,
        "per_stream_mismatches": wrong,
    }
