"""The soak's traffic: logical streams with plans (complete, resume, late, abandon, delete, hammer),
the users that run them, and what each connection received."""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from bench.http1 import Http1Connection, HttpError
from bridge.sse import Parser

STREAM_PATH = "/api/v2/bali-zero/chat-stream"
STATS_PATH = "/api/v2/bali-zero/stream-stats"

MIN_OPEN_GAP_S = 0.25  # a normal user opens at most one stream per this long (stays under RATE_LIMIT)
HAMMER_EXTRA = 20  # a hammer burst is RATE_LIMIT + this many parallel opens: >= this many 429s each
HAMMER_PAUSE_S = 1.0


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
    memtrace_at_s: tuple[float, ...] = ()  # probe times (s of traffic) under bench.lab.memtrace
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
