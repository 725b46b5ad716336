"""Soak test: thousands of real SSE streams with disconnects, resumes, stops and rate-limit abuse,
then a full accounting of every token, every upstream stream, the bridge's resources and the audit.

``make soak`` runs ``python -m bench.soak`` (1 000 streams for 60 s). It starts an echo stub and one
bridge on loopback, warms up, measures the bridge's open fds and RSS, then keeps ``--concurrency``
logical streams running for ``--duration`` seconds. Each logical stream has a plan:

* ``complete``: read to ``done``;
* ``resume``: disconnect at random tokens (1 to 3 times) and reconnect with ``Last-Event-ID`` after
  a pause well inside ``RESUME_GRACE_S``; must still end with ``done``;
* ``late``: disconnect, reconnect after the grace window: must get one ``STREAM_EXPIRED`` frame;
* ``abandon``: disconnect for good (the bridge cancels upstream when the grace window ends);
* ``delete``: ``DELETE /chat-stream/{id}`` while reading; upstream must be cancelled.

A few ``hammer`` users open short streams far faster than ``RATE_LIMIT`` allows (429s expected).

Queries encode their own answer (``u7-s12-t0,u7-s12-t1,...`` with ``--echo-delimiter ,``), so
every token received is checked by index: no loss, no duplicate, no reorder, across resumes.
Afterwards: the stub's ``stream_end`` lines (one per stream, outcome as the client saw it),
``stream-stats`` (nothing open), fds and RSS back near the warm-up baseline, and after SIGTERM
``audit verify`` passes and the audit's event counts equal what the soak observed.

The summary is printed as JSON and written to ``--out`` (default ``bench/results/soak.json``).
Exit status: 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psutil

from bench.http1 import Http1Connection, HttpError
from bench.loadgen import raise_fd_limit
from bench.procs import HttpServer, StubProc, start_bridge, start_traced_bridge
from bridge.sse import Parser
from bzb_shared.childproc import ROOT, base_env
from bzb_shared.fit import least_squares_slope

STREAM_PATH = "/api/v2/bali-zero/chat-stream"
STATS_PATH = "/api/v2/bali-zero/stream-stats"
MIN_OPEN_GAP_S = 0.25  # a normal user opens at most one stream per this long (stays under RATE_LIMIT)
MAX_FAILURES_KEPT = 50
HAMMER_EXTRA = 20  # a hammer burst is RATE_LIMIT + this many parallel opens: >= this many 429s each
HAMMER_PAUSE_S = 1.0


# ---------------------------------------------------------------------------------------- model


@dataclass
class Plan:
    kind: str  # complete | resume | late | abandon | delete | hammer
    n: int
    cuts: list[int] = field(default_factory=list)  # disconnect after this many tokens received
    pauses: list[float] = field(default_factory=list)  # before each reconnect (none: abandon)
    delete_at: int | None = None


@dataclass
class LStream:
    """One logical stream: every connection it used and what arrived on each."""

    lid: str
    user: str
    plan: Plan
    started: bool = False  # the opening request got 200
    status: int = 0
    stream_id: str = ""
    tokens: list[str] = field(default_factory=list)
    connections: int = 0
    resumes: int = 0
    done: bool = False
    error_code: str | None = None  # code of a final error frame
    error_message: str = ""  # its message: the refusals of a resume differ per cause
    # Per reconnect: seconds from the cut to sending the request, and from there to the response
    # head; tells a client that came back late (its own loop lagging) from a bridge that refused early.
    away: list[tuple[float, float]] = field(default_factory=list)
    expired: bool = False  # a resume answered STREAM_EXPIRED
    deleted: bool = False  # DELETE answered 204
    failures: list[str] = field(default_factory=list)

    @property
    def expected(self) -> list[str]:
        return [f"{self.lid}-t{i}" for i in range(self.plan.n)]

    @property
    def query(self) -> str:
        return ",".join(self.expected)

    def fail(self, why: str) -> None:
        self.failures.append(why)


@dataclass
class Options:
    duration: float
    concurrency: int
    token_delay_ms: float
    grace_s: float
    hammer_users: int
    warmup_s: float
    seed: int
    out: Path
    rss_margin_mib: float
    fd_margin: int
    rate_limit: int
    rate_window_s: int
    bridge_env: dict[str, str] = field(default_factory=dict)
    memtrace_at_s: tuple[float, ...] = ()  # probe times (s of traffic) under bench.memtrace
    memtrace_frames: int = 0  # > 0: tracemalloc too, with this many frames
    chart: Path | None = None


class Soak:
    def __init__(self, opts: Options, host: str, port: int) -> None:
        self.opts = opts
        self.host, self.port = host, port
        self.rng = random.Random(opts.seed)
        self.streams: list[LStream] = []
        self.seq = 0
        self.rejected_429 = 0
        self.retry_after_missing = 0
        self.other_rejections: Counter[int] = Counter()
        self.tasks: set[asyncio.Task[None]] = set()
        self.opened = 0  # streams whose opening request got 200 (the RSS timeline's x axis)
        self.delay_s = opts.token_delay_ms / 1000
        self.read_timeout = max(30.0, opts.grace_s * 3)

    # -- plans ---------------------------------------------------------------------------------

    def long_n(self, cut: int) -> int:
        """Tokens for a stream that must still be running ``grace + margin`` after ``cut``."""
        return cut + math.ceil((self.opts.grace_s + 5.0) / max(self.delay_s, 0.001)) + self.rng.randint(2, 10)

    def plan(self, remaining_s: float) -> Plan:
        rng, grace = self.rng, self.opts.grace_s
        roll = rng.random()
        # Near the end only plans that finish quickly, so the run's tail stays short.
        tail = remaining_s < grace + 2
        if roll < 0.15:
            n = rng.randint(15, 40)
            cuts = sorted(rng.sample(range(1, n - 1), rng.randint(1, 3)))
            return Plan("resume", n, cuts, [rng.uniform(0.05, min(1.5, grace * 0.3)) for _ in cuts])
        if roll < 0.23 and not tail:
            cut = rng.randint(1, 3)
            # Well past the window: the bridge may notice the disconnect late when its loop is busy.
            return Plan("late", self.long_n(cut), [cut], [grace + rng.uniform(2.0, 3.0)])
        if roll < 0.30 and not tail:
            cut = rng.randint(1, 3)
            return Plan("abandon", self.long_n(cut), [cut])
        if roll < 0.40:
            cut = rng.randint(1, 5)
            return Plan("delete", cut + math.ceil(1.5 / max(self.delay_s, 0.001)) + rng.randint(2, 10), delete_at=cut)
        return Plan("complete", rng.randint(10, 30))

    def new_stream(self, user: str, plan: Plan) -> LStream:
        self.seq += 1
        stream = LStream(f"{user}-s{self.seq}", user, plan)
        self.streams.append(stream)
        return stream

    # -- one logical stream --------------------------------------------------------------------

    async def run_stream(self, s: LStream, first_leg_done: asyncio.Event) -> None:
        try:
            await self._run_stream(s, first_leg_done)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, HttpError, ValueError) as exc:
            s.fail(f"{type(exc).__name__}: {exc}")
        finally:
            first_leg_done.set()

    async def _run_stream(self, s: LStream, first_leg_done: asyncio.Event) -> None:
        path = f"{STREAM_PATH}?query={quote(s.query, safe='')}"
        last_id: str | None = None
        cut_at = 0.0
        for cut_no in range(len(s.plan.cuts) + 1):
            headers = {"Accept": "text/event-stream", "x-user-id": s.user, "x-request-id": s.lid}
            if last_id is not None:
                headers["Last-Event-ID"] = last_id
            conn = Http1Connection(self.host, self.port, timeout=self.read_timeout)
            try:
                sent = time.monotonic()
                head = await conn.request("GET", path, headers)
                if last_id is not None:
                    s.away.append((round(sent - cut_at, 2), round(time.monotonic() - sent, 2)))
                s.connections += 1
                if last_id is None:
                    s.status = head.status
                    if head.status == 429:
                        self.rejected_429 += 1
                        self.retry_after_missing += "retry-after" not in head.headers
                        await conn.body()
                        return
                    if head.status != 200 or not head.is_event_stream:
                        self.other_rejections[head.status] += 1
                        s.fail(f"open answered {head.status}: {(await conn.body())[:200]!r}")
                        return
                    s.started = True
                    self.opened += 1
                else:
                    s.resumes += 1
                    if head.status == 204:  # only when the client already has the final frame
                        s.fail("resume answered 204 before the final frame was received")
                        return
                    if head.status != 200 or not head.is_event_stream:
                        s.fail(f"resume answered {head.status}: {(await conn.body())[:200]!r}")
                        return
                cut = s.plan.cuts[cut_no] if cut_no < len(s.plan.cuts) else None
                last_id = await self._read(s, conn, cut)
                cut_at = time.monotonic()
            finally:
                conn.close()
            if last_id is None:
                return  # the stream ended (done, error, or stopped by DELETE)
            # We disconnected on purpose after token number ``cut``.
            pause = s.plan.pauses[cut_no] if cut_no < len(s.plan.pauses) else None
            first_leg_done.set()  # the user's slot moves on; this stream comes back on its own
            if pause is None:
                return  # abandoned for good
            await asyncio.sleep(pause)
        s.fail("more legs than planned")

    async def _read(self, s: LStream, conn: Http1Connection, cut: int | None) -> str | None:
        """Read one connection. Returns the Last-Event-ID to resume from when we cut it on purpose."""
        parser = Parser()
        terminal = False
        for _ in range(1_000_000):  # bounded; each read either returns data or ends the body
            chunk = await conn.read()
            if chunk is None:
                break
            for event in parser.feed(chunk):
                if event.type != "message":
                    continue
                if terminal:
                    s.fail(f"frame after the final frame: {event.data[:100]}")
                    continue
                frame = json.loads(event.data)
                kind = frame.get("type")
                if kind == "metadata":
                    if s.stream_id:
                        s.fail("metadata frame sent twice")
                    s.stream_id = str(frame.get("stream_id", ""))
                    if frame.get("request_id") != s.lid:
                        s.fail(f"metadata request_id {frame.get('request_id')!r} != {s.lid!r}")
                elif kind == "token":
                    self._token(s, frame)
                    if cut is not None and len(s.tokens) == cut:
                        return event.last_event_id  # drop whatever else this read brought
                    if s.plan.delete_at is not None and len(s.tokens) == s.plan.delete_at and not s.deleted:
                        await self._delete(s)
                elif kind == "done":
                    terminal, s.done = True, True
                    if len(s.tokens) != s.plan.n:
                        s.fail(f"done after {len(s.tokens)} of {s.plan.n} tokens")
                    if frame.get("metrics", {}).get("tokens") != s.plan.n:
                        s.fail(f"done metrics.tokens {frame.get('metrics', {}).get('tokens')} != {s.plan.n}")
                elif kind == "error":
                    terminal = True
                    s.error_code = str(frame.get("code"))
                    s.error_message = str(frame.get("message", ""))
                    if s.error_code == "STREAM_EXPIRED" and s.connections > 1:
                        s.expired = True
                else:
                    s.fail(f"unknown frame type {kind!r}")
        if not terminal:
            # An explicit stop ends the response with STREAM_CANCELLED too: every stream ends with
            # exactly one done or error frame.
            s.fail("the response ended without a done or error frame")
        return None

    def _token(self, s: LStream, frame: dict[str, Any]) -> None:
        index, text = frame.get("index"), frame.get("text")
        at = len(s.tokens)
        if index != at:
            s.fail(f"token index {index} where {at} was due")
        if at >= s.plan.n or text != f"{s.lid}-t{at}":
            s.fail(f"token {text!r} where {s.lid}-t{at} was due")
        s.tokens.append(str(text))

    async def _delete(self, s: LStream) -> None:
        conn = Http1Connection(self.host, self.port, timeout=self.read_timeout)
        try:
            head = await conn.request("DELETE", f"{STREAM_PATH}/{s.stream_id}", {"x-user-id": s.user})
            await conn.body()
        finally:
            conn.close()
        if head.status != 204:
            s.fail(f"DELETE answered {head.status}")
        s.deleted = True

    # -- users ---------------------------------------------------------------------------------

    async def slot(self, index: int, deadline: float, plans: Callable[[float], Plan]) -> None:
        user = f"u{index}"
        for _ in range(1_000_000):
            now = time.monotonic()
            if now >= deadline:
                return
            s = self.new_stream(user, plans(deadline - now))
            leg = asyncio.Event()
            task = asyncio.get_running_loop().create_task(self.run_stream(s, leg))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            await leg.wait()
            await asyncio.sleep(max(0.0, MIN_OPEN_GAP_S - (time.monotonic() - now)))

    async def hammer(self, index: int, deadline: float) -> None:
        """Bursts of more parallel opens than RATE_LIMIT allows in a whole window, however slow the host."""
        user = f"h{index}"
        for _ in range(1_000_000):
            if time.monotonic() >= deadline:
                return
            burst = [self.new_stream(user, Plan("hammer", 1)) for _ in range(self.opts.rate_limit + HAMMER_EXTRA)]
            await asyncio.gather(*(self.run_stream(s, asyncio.Event()) for s in burst))
            await asyncio.sleep(HAMMER_PAUSE_S)

    async def phase(self, seconds: float, concurrency: int, hammers: int) -> None:
        start = time.monotonic()
        deadline = start + seconds
        slots = [asyncio.ensure_future(self._ramped(i, concurrency, deadline, self.plan)) for i in range(concurrency)]
        slots += [asyncio.ensure_future(self.hammer(j, deadline)) for j in range(hammers)]
        await asyncio.wait(slots, timeout=seconds + 60)
        # Streams still running (resumes after a pause, the last reads): bounded wait.
        tail = seconds + self.opts.grace_s * 2 + 60
        for _ in range(10_000):
            pending = [t for t in self.tasks if not t.done()]
            if not pending or time.monotonic() - start > tail:
                break
            await asyncio.wait(pending, timeout=1)
        for task in [*slots, *self.tasks]:
            if not task.done():
                task.cancel()
        await asyncio.sleep(0)

    async def _ramped(self, i: int, n: int, deadline: float, plans: Callable[[float], Plan]) -> None:
        await asyncio.sleep(min(2.0, self.opts.duration / 10) * i / n)  # spread the first connects
        await self.slot(i, deadline, plans)

    async def get_json(self, path: str) -> Any:
        conn = Http1Connection(self.host, self.port, timeout=10)
        try:
            await conn.request("GET", path, {"Accept": "application/json"})
            return json.loads(await conn.body())
        finally:
            conn.close()


# -------------------------------------------------------------------------------------- checks


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
    from bench.memtrace import growth, load_snapshot, pymalloc_summary, total_kib

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


def parse_args(argv: Sequence[str] | None) -> Options:
    p = argparse.ArgumentParser(prog="bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=60.0, help="seconds of mixed traffic")
    p.add_argument("--concurrency", type=int, default=1000, help="logical streams kept running")
    p.add_argument(
        "--token-delay-ms",
        type=float,
        default=None,
        help="stub pacing (default: 20, slowed for high concurrency so 2 cores keep up)",
    )
    p.add_argument("--grace-s", type=float, default=5.0, help="RESUME_GRACE_S of the bridge")
    p.add_argument("--hammer-users", type=int, default=3, help="users that exceed the rate limit")
    p.add_argument("--warmup-s", type=float, default=None, help="warm-up before the baseline")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--out", default=str(ROOT / "bench" / "results" / "soak.json"), help="summary file (a directory gets soak.json)"
    )
    p.add_argument("--rss-margin-mib", type=float, default=None, help="allowed RSS growth over the baseline")
    p.add_argument("--fd-margin", type=int, default=8, help="allowed open-fd growth over the baseline")
    p.add_argument(
        "--chart",
        default=None,
        metavar="PNG",
        help="also draw the RSS timeline (RSS over time and over streams started) to this file",
    )
    p.add_argument(
        "--bridge-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra bridge setting, repeatable (elimination runs: TELEMETRY off, another AUDIT_DB...)",
    )
    p.add_argument(
        "--memtrace-at",
        default="",
        metavar="MIN,MIN",
        help="diagnosis: run the bridge under bench.memtrace, probe its memory at these minutes of "
        "traffic (pymalloc arenas; tracemalloc with --memtrace-frames) and report the growth between the last two",
    )
    p.add_argument(
        "--memtrace-frames",
        type=int,
        default=0,
        help="also trace Python allocations with this many frames (~half the throughput); 0: allocator stats only",
    )
    a = p.parse_args(argv)
    try:
        memtrace_at = tuple(sorted(float(m) * 60 for m in a.memtrace_at.split(",") if m.strip()))
    except ValueError:
        p.error(f"--memtrace-at wants minutes like 6,11, got {a.memtrace_at!r}")
    extra: dict[str, str] = {}
    for item in a.bridge_env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            p.error(f"--bridge-env wants NAME=VALUE, got {item!r}")
        extra[name] = value
    out = Path(a.out)
    if out.suffix != ".json":
        out = out / "soak.json"
    concurrency = max(1, min(a.concurrency, 5000))
    # ~5 000 tokens/s is what the stub, the bridge and this client share well on 2 cores.
    delay = a.token_delay_ms if a.token_delay_ms is not None else max(20.0, concurrency / 5.0)
    warmup = a.warmup_s if a.warmup_s is not None else min(5.0, max(3.0, a.duration / 6))
    return Options(
        duration=max(1.0, min(a.duration, 3600.0)),
        concurrency=concurrency,
        token_delay_ms=delay,
        grace_s=a.grace_s,
        hammer_users=max(0, a.hammer_users),
        warmup_s=warmup,
        seed=a.seed,
        out=out,
        # Bounded caches still fill after the warm-up (stats window buckets, SQLite page cache,
        # allocator arenas): a flat allowance plus a little per concurrent stream.
        rss_margin_mib=a.rss_margin_mib if a.rss_margin_mib is not None else 16.0 + concurrency * 0.02,
        fd_margin=a.fd_margin,
        # A normal user opens <= 10 s / MIN_OPEN_GAP_S = 40 streams per 10 s; hammers try ~200.
        rate_limit=60,
        rate_window_s=10,
        bridge_env=extra,
        memtrace_at_s=memtrace_at,
        memtrace_frames=max(0, a.memtrace_frames),
        chart=Path(a.chart) if a.chart else None,
    )


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    fd_limit = raise_fd_limit()  # the children inherit it
    started_at = time.monotonic()
    failures: list[str] = []
    summary: dict[str, Any] = {
        "concurrency": opts.concurrency,
        "duration_s": opts.duration,
        "token_delay_ms": opts.token_delay_ms,
        "resume_grace_s": opts.grace_s,
        "rate_limit": f"{opts.rate_limit} per {opts.rate_window_s} seconds",
        "hammer_users": opts.hammer_users,
        "fd_limit": fd_limit,
        "seed": opts.seed,
        "bridge_env": opts.bridge_env,
    }
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        audit_db = Path(tmp) / "audit.sqlite3"
        stub = StubProc(
            ["--mode", "echo", "--echo-delimiter", ",", "--token-delay-ms", f"{opts.token_delay_ms:g}"], None
        )
        bridge: HttpServer | None = None
        try:
            env = {
                "RESUME_GRACE_S": f"{opts.grace_s:g}",
                "AUDIT_DB": str(audit_db),
                "RATE_LIMIT": f"{opts.rate_limit} per {opts.rate_window_s} seconds",
                "TRUSTED_PROXIES": "127.0.0.1/32",
                "MAX_STREAMS_PER_USER": "1000000",
                "MAX_STREAMS_TOTAL": "1000000",
                # A soak user holds far more streams than a real one may (the line above), so its
                # resumes and stops would outrun a budget sized for MAX_STREAMS_PER_USER streams.
                "CONTROL_RATE_LIMIT": "1000000/minute",
                "LOG_LEVEL": "WARNING",
                **opts.bridge_env,
            }
            probes = Path(tmp) / "memtrace"
            if opts.memtrace_at_s:
                bridge = start_traced_bridge(stub.target, probes, opts.memtrace_frames, Path(tmp), **env)
            else:
                bridge = start_bridge(stub.target, None, Path(tmp), **env)
            run(opts, stub, bridge, audit_db, summary, failures)
            if opts.memtrace_at_s:
                summary["memtrace"] = memtrace_growth(probes, opts.memtrace_at_s, failures)
        finally:
            if bridge is not None:
                bridge.stop(30)
            stub.stop()
    summary["wall_s"] = round(time.monotonic() - started_at, 1)
    summary["failures"] = failures[:MAX_FAILURES_KEPT]
    summary["failure_count"] = len(failures)
    summary["ok"] = not failures
    text = json.dumps(summary, indent=2)
    print(text, flush=True)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(text + "\n")
    if opts.chart is not None and "resources" in summary:
        chart(summary, opts.chart)
    return 0 if not failures else 1


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


def run(
    opts: Options, stub: StubProc, bridge: HttpServer, audit_db: Path, summary: dict[str, Any], failures: list[str]
) -> None:
    import uvloop

    host, port = "127.0.0.1", int(bridge.url.rsplit(":", 1)[1])
    soak = Soak(opts, host, port)
    ps = psutil.Process(bridge.proc.pid)

    def resources() -> tuple[int, int]:
        return int(ps.num_fds()), int(ps.memory_info().rss)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:

        def stats() -> dict[str, Any]:
            return dict(runner.run(soak.get_json(STATS_PATH)))

        def idle(sessions: bool = True) -> bool:
            snap = stats()
            return bool(
                snap["open_streams"] == 0
                and snap["open_connections_by_cap"] == 0
                and (not sessions or snap["sessions_held"] == 0)
            )

        settle_s = opts.grace_s + 30
        # Warm-up with the same mix at full concurrency, so the baseline already has the pools and
        # arenas a run needs. Sessions kept for the grace window may still be held: a conservative
        # baseline (the final figures are taken once they are gone).
        runner.run(soak.phase(opts.warmup_s, opts.concurrency, hammers=opts.hammer_users))
        warm = len(soak.streams)
        if not poll(lambda: idle(sessions=False), settle_s):
            failures.append(f"after the warm-up the bridge is not idle: {stats()}")
        time.sleep(0.5)
        fds0, rss0 = resources()
        summary["baseline"] = {"fds": fds0, "rss_mib": round(rss0 / 2**20, 1), "warmup_streams": warm}

        t0 = time.monotonic()
        peak = {"fds": 0, "rss": 0}
        cpu0 = {"bridge": cpu_s(ps), "stub": cpu_s(stub.ps), "client": cpu_s(psutil.Process())}

        # [seconds, open fds, RSS MiB, streams started since t0, anonymous MiB, file-backed MiB]
        # every 5 s: the slope per stream started is what tells a leak from a busy box (a loaded
        # host just starts fewer streams).
        timeline: list[list[float]] = []
        opened0 = soak.opened

        snapshot_times = list(opts.memtrace_at_s)

        async def sample() -> None:
            for i in range(100_000):
                if snapshot_times and time.monotonic() - t0 >= snapshot_times[0]:
                    snapshot_times.pop(0)
                    os.kill(ps.pid, signal.SIGUSR2)  # bench.memtrace dumps a snapshot
                fds, rss = resources()
                peak["fds"], peak["rss"] = max(peak["fds"], fds), max(peak["rss"], rss)
                if i % 60 == 0:
                    # The client keeps every stream's record (tokens included) for the final
                    # accounting: millions of objects, which a full collection scans. In the
                    # 30-minute run those collections stalled this client's loop for ~3.5 s at a
                    # time, so planned 1 s reconnects arrived after the 5 s window (clusters of
                    # STREAM_EXPIRED charged to the bridge). Frozen objects are not scanned again.
                    gc.freeze()
                if i % 10 == 0:
                    resident, anonymous, file_backed = memory_split_mib(ps.pid)
                    timeline.append(
                        [
                            round(time.monotonic() - t0, 1),
                            fds,
                            resident,
                            soak.opened - opened0,
                            anonymous,
                            file_backed,
                        ]
                    )
                await asyncio.sleep(0.5)

        async def main_phase() -> None:
            sampler = asyncio.ensure_future(sample())
            try:
                await soak.phase(opts.duration, opts.concurrency, hammers=opts.hammer_users)
            finally:
                sampler.cancel()

        runner.run(main_phase())
        traffic_s = time.monotonic() - t0
        cpu = {"bridge": cpu_s(ps), "stub": cpu_s(stub.ps), "client": cpu_s(psutil.Process())}
        summary["cpu_s"] = {k: round(cpu[k] - cpu0[k], 1) for k in cpu}
        summary["cpu_s"]["load_average_1m"] = round(os.getloadavg()[0], 2)

        if not poll(idle, settle_s):
            failures.append(f"after the run the bridge is not idle: {stats()}")
        final_stats = stats()
        back = poll(
            lambda: resources()[0] <= fds0 + opts.fd_margin and resources()[1] <= rss0 + opts.rss_margin_mib * 2**20,
            15,
            0.5,
        )
        fds1, rss1 = resources()
        if not back:
            failures.append(
                f"resources did not return to baseline: fds {fds0} -> {fds1} (margin {opts.fd_margin}), "
                f"RSS {rss0 / 2**20:.1f} -> {rss1 / 2**20:.1f} MiB (margin {opts.rss_margin_mib:g})"
            )
    # Every stream the stub served has ended by now (the bridge is idle); give the pipe a moment.
    n_started = sum(1 for s in soak.streams if s.started)
    poll(lambda: len(stub_end_lines(stub)) >= n_started, 10)

    bridge.signal(signal.SIGTERM)
    try:
        code: int | None = bridge.wait(60)
    except subprocess.TimeoutExpired:
        code = None
        bridge.kill()
    if code != 0:
        failures.append(f"bridge exited with {code} after SIGTERM")

    check_streams(soak.streams, failures)
    stub_report = check_stub(soak.streams, stub_end_lines(stub), failures)
    audit_report = check_audit(soak.streams, soak.rejected_429, audit_db, failures)
    if soak.retry_after_missing:
        failures.append(f"{soak.retry_after_missing} 429 answers without Retry-After")
    if soak.other_rejections:
        failures.append(f"unexpected statuses on open: {dict(soak.other_rejections)}")

    # Every resume that was served (not answered STREAM_EXPIRED) is one reconnection for the bridge.
    served = sum(s.resumes - s.expired for s in soak.streams)
    if final_stats.get("reconnections") != served:
        failures.append(
            f"stream-stats counts {final_stats.get('reconnections')} reconnections, the soak resumed {served} times"
        )
    main_streams = soak.streams[warm:]
    started = [s for s in main_streams if s.started]
    plans = Counter(s.plan.kind for s in started)
    summary.update(
        {
            "traffic_s": round(traffic_s, 1),
            "streams": {
                "started": len(started),
                "warmup": warm,
                "by_plan": dict(plans),
                "completed": sum(s.done for s in started),
                "cancelled": sum(expected_outcome(s) == "cancelled" for s in started),
                "failed": sum(expected_outcome(s) == "error" for s in started),
                "deleted": sum(s.deleted for s in started),
                "abandoned": plans["abandon"],
            },
            "tokens": sum(len(s.tokens) for s in main_streams),
            "tokens_per_s": round(sum(len(s.tokens) for s in main_streams) / max(traffic_s, 0.001)),
            "connections": sum(s.connections for s in main_streams),
            "resumes": sum(s.resumes for s in main_streams),
            "expired": sum(s.expired for s in main_streams),
            "rate_limited_429": soak.rejected_429,
            "resources": {
                "fds_before": fds0,
                "fds_peak": peak["fds"],
                "fds_after": fds1,
                "rss_before_mib": round(rss0 / 2**20, 1),
                "rss_peak_mib": round(peak["rss"] / 2**20, 1),
                "rss_after_mib": round(rss1 / 2**20, 1),
                "returned": back,
                "timeline": timeline,
            },
            "rss_slope": rss_slope(timeline, opts.duration),
            "stream_stats_after": {
                k: final_stats.get(k)
                for k in (
                    "open_streams",
                    "sessions_held",
                    "open_connections_by_cap",
                    "streams_opened",
                    "outcomes",
                    "reconnections",
                )
            },
            "stub": stub_report,
            "audit": audit_report,
            "bridge_stderr_tail": bridge.stderr_lines[-5:],
        }
    )


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
    os._exit(130)
