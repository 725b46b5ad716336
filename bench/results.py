"""What the benchmarks measure, as typed records.

Every scenario returns one of these dataclasses and the report is ``dataclasses.asdict`` of them,
so the JSON file, the markdown table and the chart read the same fields by name: a typo is a mypy
error, not a silent ``None`` in a table cell.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100) of already sorted values."""
    if not sorted_values:
        return None
    if len(sorted_values) == 1:
        return float(sorted_values[0])
    rank = (len(sorted_values) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return float(sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low))


@dataclass(frozen=True, slots=True)
class Summary:
    """Percentiles of one set of samples (None where there were no samples)."""

    n: int = 0
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None
    max: float | None = None
    mean: float | None = None

    @classmethod
    def of(cls, values: Iterable[float]) -> Summary:
        ordered = sorted(values)
        if not ordered:
            return cls()
        return cls(
            n=len(ordered),
            p50=percentile(ordered, 50),
            p95=percentile(ordered, 95),
            p99=percentile(ordered, 99),
            max=float(ordered[-1]),
            mean=sum(ordered) / len(ordered),
        )

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Summary:
        return cls(
            int(data.get("n") or 0),
            data.get("p50"),
            data.get("p95"),
            data.get("p99"),
            data.get("max"),
            data.get("mean"),
        )


def merge_counts(counts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for one in counts:
        for key, value in one.items():
            out[key] = out.get(key, 0) + value
    return out


def sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def div(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


# ------------------------------------------------------------------------------ one load generator


@dataclass(frozen=True, slots=True)
class ClosedStream:
    """A stream the load generator closed on purpose: when (wall clock), after how many tokens."""

    request_id: str
    closed_at: float
    tokens: int


@dataclass(slots=True)
class LoadgenResult:
    """The ``result`` line of one ``bench.loadgen`` run, plus the CPU the harness saw around it."""

    kind: str
    streams: int
    completed: int
    errors: dict[str, int]
    error_examples: list[str]
    tokens: int
    heartbeats: int
    wall_s: float
    tokens_per_s: float | None
    cpu_s: float
    cpu_utilisation: float | None
    max_rss_kib: int
    first_token_ms: Summary
    gap_ms: Summary
    parser: str
    first_token_ms_all: list[float] = field(default_factory=list)
    closed: list[ClosedStream] = field(default_factory=list)
    server_cpu_s: float | None = None
    stub_cpu_s: float = 0.0

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LoadgenResult:
        return cls(
            kind=str(data["kind"]),
            streams=int(data["streams"]),
            completed=int(data["completed"]),
            errors=dict(data["errors"]),
            error_examples=list(data["error_examples"]),
            tokens=int(data["tokens"]),
            heartbeats=int(data["heartbeats"]),
            wall_s=float(data["wall_s"]),
            tokens_per_s=data["tokens_per_s"],
            cpu_s=float(data["cpu_s"]),
            cpu_utilisation=data["cpu_utilisation"],
            max_rss_kib=int(data["max_rss_kib"]),
            first_token_ms=Summary.from_json(data["first_token_ms"]),
            gap_ms=Summary.from_json(data["gap_ms"]),
            parser=str(data["parser"]),
            first_token_ms_all=list(data.get("first_token_ms_all", [])),
            closed=[ClosedStream(str(r or ""), float(at or 0), int(n)) for r, at, n in data.get("closed", [])],
        )


def per_1k_tokens(results: Sequence[LoadgenResult], cpu: Sequence[float | None]) -> float | None:
    """CPU seconds per 1 000 tokens over several runs (None if any run lacked the figure)."""
    tokens = sum(r.tokens for r in results)
    if not tokens or any(v is None for v in cpu):
        return None
    return sum(v for v in cpu if v is not None) / tokens * 1000


# ---------------------------------------------------------------------------------- the scenarios


@dataclass(slots=True)
class LatencyTarget:
    first_token_ms: Summary
    round_p50s: list[float | None]
    completed: int
    errors: dict[str, int]
    loadgen_cpu_utilisation: float | None
    samples_ms: list[float]


@dataclass(slots=True)
class LatencyResult:
    clients: int
    tokens: int
    requests_per_target: int
    targets: dict[str, LatencyTarget]
    added_p50_ms: dict[str, float | None] = field(default_factory=dict)
    added_p99_ms: dict[str, float | None] = field(default_factory=dict)


@dataclass(slots=True)
class ThroughputTarget:
    tokens_per_s: float
    tokens_per_s_rounds: list[float | None]
    tokens: int
    completed: int
    errors: dict[str, int]
    stub_cpu_s_per_1k_tokens: float | None
    loadgen_cpu_s_per_1k_tokens: float | None
    loadgen_cpu_utilisation: float | None
    first_token_ms_p50: float
    server_cpu_s_per_1k_tokens: float | None = None
    server_cpu_utilisation: float | None = None

    @property
    def cpu_s_per_1k_tokens(self) -> float | None:
        """The system under test's CPU per 1 000 tokens (for direct gRPC: the client itself)."""
        return self.server_cpu_s_per_1k_tokens or self.loadgen_cpu_s_per_1k_tokens

    @property
    def stub_cpu_share(self) -> float | None:
        if self.stub_cpu_s_per_1k_tokens is None:
            return None
        return self.stub_cpu_s_per_1k_tokens * self.tokens_per_s / 1000

    @property
    def core0_ceiling_tokens_per_s(self) -> float | None:
        """1 / (stub + HTTP load generator CPU per token): what core 0 could carry (HTTP targets only)."""
        if self.server_cpu_s_per_1k_tokens is None:
            return None
        if self.stub_cpu_s_per_1k_tokens is None or self.loadgen_cpu_s_per_1k_tokens is None:
            return None
        return 1000 / (self.stub_cpu_s_per_1k_tokens + self.loadgen_cpu_s_per_1k_tokens)


@dataclass(slots=True)
class ThroughputResult:
    clients: int
    tokens: int
    streams_per_round: int
    rounds: int
    targets: dict[str, ThroughputTarget]


@dataclass(slots=True)
class PacedLevel:
    streams: int
    completed: int
    errors: dict[str, int]
    error_examples: list[str]
    gap_ms: Summary
    first_token_ms: Summary
    loadgen_cpu_utilisation: float | None
    server_cpu_utilisation: float | None
    stub_cpu_utilisation: float
    stub_saturated: bool

    def holds(self, limit_ms: float) -> bool:
        """The pace held: p99 gap within the limit and (almost) every stream completed."""
        p99 = self.gap_ms.p99
        return p99 is not None and p99 <= limit_ms and self.completed >= self.streams * 0.99


@dataclass(slots=True)
class PacedTarget:
    levels: list[PacedLevel]
    knee_streams: int | None
    max_paced_streams: int
    knee_is_lower_bound: bool


@dataclass(slots=True)
class PacedResult:
    pacing_ms: float
    tokens: int
    levels: list[int]
    knee_p99_gap_ms: float
    targets: dict[str, PacedTarget]


@dataclass(slots=True)
class IdleTarget:
    open_streams: int
    rss_per_stream_kib: float | None
    rss_before_mib: float | None = None
    rss_during_mib: float | None = None
    rss_after_close_mib: float | None = None
    heartbeats_received: int | None = None
    errors: dict[str, int] = field(default_factory=dict)
    method: str = "server RSS growth per open stream"


@dataclass(slots=True)
class IdleResult:
    streams: int
    heartbeat_s: float
    first_token_delay_ms: int
    targets: dict[str, IdleTarget]


@dataclass(slots=True)
class CancelTarget:
    closed: int
    no_request_id: int
    outcomes: dict[str, int]
    close_to_cancelled_ms: Summary
    samples_ms: list[float]
    errors: dict[str, int]


@dataclass(slots=True)
class CancelResult:
    streams: int
    close_after_tokens: int
    pacing_ms: float
    tokens: int
    targets: dict[str, CancelTarget]


@dataclass(slots=True)
class SlowReaderTarget:
    rss_before_mib: float
    rss_peak_during_stall_mib: float
    rss_growth_mib: float
    client_tokens_read: int
    upstream_tokens_sent: list[int]
    upstream_outcomes: list[str]
    rss_series_mib: list[tuple[float, float]]


@dataclass(slots=True)
class SlowReaderResult:
    upstream_tokens: int
    stall_s: float
    stall_after_tokens: int
    client_rcvbuf: int
    targets: dict[str, SlowReaderTarget]


ScenarioResult = LatencyResult | ThroughputResult | PacedResult | IdleResult | CancelResult | SlowReaderResult


@dataclass(slots=True)
class ScenarioFailure:
    """A scenario that raised: reported, while the other scenarios still run."""

    error: str


@dataclass(slots=True)
class Scenarios:
    """One slot per scenario; None when it was not run."""

    first_token_latency: LatencyResult | ScenarioFailure | None = None
    throughput: ThroughputResult | ScenarioFailure | None = None
    paced_concurrency: PacedResult | ScenarioFailure | None = None
    idle_connections: IdleResult | ScenarioFailure | None = None
    cancellation: CancelResult | ScenarioFailure | None = None
    slow_reader: SlowReaderResult | ScenarioFailure | None = None
    elapsed_s: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------- the report


@dataclass(frozen=True, slots=True)
class Check:
    """One README target: the measured value (None when not measured), the goal, and whether it was met."""

    name: str
    value: float | None
    target: str
    met: bool | None
    note: str = ""


@dataclass(slots=True)
class Machine:
    nproc: int | None
    usable_cpus: int
    cpu_model: str
    kernel: str
    python: str


@dataclass(slots=True)
class Meta:
    date: str
    git_commit: str
    machine: Machine
    quick: bool
    pinned: bool
    targets: list[str]
    profile: dict[str, Any]
    fd_limit: int
    loadavg_start: tuple[float, float, float]
    cpus: dict[str, list[int]] = field(default_factory=dict)
    loadavg_end: tuple[float, float, float] | None = None
    elapsed_s: float | None = None


@dataclass(slots=True)
class Report:
    meta: Meta
    scenarios: Scenarios
    checks: list[Check] = field(default_factory=list)


# ------------------------------------------------------------------------------ first-token timeline


@dataclass(frozen=True, slots=True)
class TimelineStep:
    """One interval between two consecutive marks of the request path (medians over the requests).

    ``loop_cpu_us`` is the event-loop thread's CPU, ``process_cpu_us`` every thread's (gRPC's poller
    too); ``hops`` is the number of task steps (event-loop hand-offs) inside the interval.
    """

    phase: str
    start: str
    end: str
    n: int
    wall_us: float
    loop_cpu_us: float
    process_cpu_us: float
    hops: float


@dataclass(slots=True)
class TimelineResult:
    """``bench.lab.timeline`` for one server: its request path from received bytes to the first token written."""

    server: str
    requests: int
    loadavg: tuple[float, float, float]
    client_first_token_ms: Summary
    steps: list[TimelineStep]
    total: TimelineStep
    unresolved: list[str]
    abandoned: int
    hops_by_coroutine: dict[str, float] = field(default_factory=dict)
