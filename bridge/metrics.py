"""Prometheus metrics for GET /metrics, fed through the StreamObserver protocol.

Why prometheus-client and not the OpenTelemetry Prometheus exporter: prometheus-client is the
reference implementation of the text exposition format, so what we render is what Prometheus
parses; it needs no SDK metric pipeline (readers, views, aggregation temporality) between the hot
path and the scrape, so observing a token gap is a lock and a bucket increment; and it supports a
registry per app, so two apps (or two tests) in one process never share or collide on metrics.
Traces stay on OpenTelemetry (bridge/telemetry.py); the trace id goes into logs for correlation.

Every metric lives in the registry passed in (a fresh one by default), never the global one.

With several workers (``--workers``) every worker writes its metrics into files of the
supervisor's private directory, prometheus-client's multiprocess mode, and a scrape of any
worker renders all of them: one scrape shows the whole server, and the counters of a worker that
died stay counted. In that mode the per-token histogram is prometheus-client's own (a custom
collector would show one worker only), open-stream gauges are summed over live workers, and the
resume store's counters are copied into real counters every second and at each scrape.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from bridge.types import CONNECTION_CLOSE_REASONS, ConnectionCloseReason, StreamResult

# 1 ms … 10 s, roughly 1-2.5-5 per decade: fine where interactive latency matters, coarse beyond.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DURATION_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def name_metric_files(identifier: str) -> None:
    """Multiprocess mode: write this process's metric files as ``<kind>_<identifier>.db`` instead of
    after its pid; a later process with the same identifier takes them over, its counters going on
    from their values (prometheus-client's ``MultiProcessValue``). Call it before any metric is
    made; ``identifier`` must differ between processes that run at the same time and hold no ``_``.
    """
    values.ValueClass = values.MultiProcessValue(lambda: identifier)  # type: ignore[no-untyped-call]


class BridgeMetrics:
    """The bridge's metrics; a StreamObserver plus counters the HTTP layer calls directly."""

    def __init__(self, registry: CollectorRegistry | None = None, *, multiprocess_dir: Path | None = None) -> None:
        """``multiprocess_dir``: the workers' shared metric files (only with PROMETHEUS_MULTIPROC_DIR
        naming the same directory in this process's environment, set by the supervisor)."""
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.multiprocess_dir = multiprocess_dir
        self._resume_counters: ResumeStoreCounters | None = None
        r = self.registry
        self._first_token = Histogram(
            "bridge_first_token_seconds",
            "Time from stream start to the first token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._inter_token: BatchHistogram | PerValueHistogram = (
            BatchHistogram if multiprocess_dir is None else PerValueHistogram
        )(
            "bridge_inter_token_seconds",
            "Time between consecutive tokens of one stream.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._duration = Histogram(
            "bridge_stream_duration_seconds",
            "Whole stream duration, by how it ended.",
            ["outcome"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self._streams = Counter(
            "bridge_streams",
            "Streams ended, by outcome and error code ('' when none).",
            ["outcome", "error_code"],
            registry=r,
        )
        self._tokens = Counter("bridge_tokens", "Tokens relayed to clients.", registry=r)
        self._open_streams = Gauge(
            "bridge_open_streams", "Streams currently open.", registry=r, multiprocess_mode="livesum"
        )
        self._open_connections = Gauge(
            "bridge_open_connections", "SSE connections currently held open.", registry=r, multiprocess_mode="livesum"
        )
        self._reconnections = Counter("bridge_reconnections", "Streams resumed with Last-Event-ID.", registry=r)
        self._rate_limited = Counter(
            "bridge_rate_limited", "Requests rejected by limits, by reason.", ["reason"], registry=r
        )
        self._rate_limit_storage_errors = Counter(
            "bridge_rate_limit_storage_errors",
            "Rate-limit storage failures (fail-open or -closed).",
            registry=r,
        )
        self._audit_dropped = Counter(
            "bridge_audit_dropped", "Audit records dropped because the queue was full.", registry=r
        )
        self._connections_closed = Counter(
            "bridge_connections_closed",
            "HTTP connections the bridge closed itself (a request head or body too large or late, idle), by reason.",
            ["reason"],
            registry=r,
        )
        for reason in CONNECTION_CLOSE_REASONS:  # every series exists from the start, at 0
            self._connections_closed.labels(reason)

    # ----------------------------------------------------------------- StreamObserver

    def stream_opened(self) -> None:
        self._open_streams.inc()

    def first_token(self, seconds: float) -> None:
        self._first_token.observe(seconds)

    def token_gaps(self, seconds: Sequence[float]) -> None:
        self._inter_token.observe_many(seconds)

    def stream_closed(self, result: StreamResult) -> None:
        self._open_streams.dec()
        self._streams.labels(result.outcome, result.error_code or "").inc()
        self._duration.labels(result.outcome).observe(result.duration_ms / 1000)
        if result.tokens:
            self._tokens.inc(result.tokens)

    def reconnected(self) -> None:
        self._reconnections.inc()

    # ----------------------------------------------------------------- the rest of the bridge

    def connection_opened(self) -> None:
        self._open_connections.inc()

    def connection_closed(self) -> None:
        self._open_connections.dec()

    def rate_limited(self, reason: str) -> None:
        """``reason``: a small fixed set such as "rate", "concurrency", "global" (label cardinality)."""
        self._rate_limited.labels(reason).inc()

    def rate_limit_storage_failed(self) -> None:
        self._rate_limit_storage_errors.inc()

    def audit_dropped(self, count: int = 1) -> None:
        self._audit_dropped.inc(count)

    def watch_resume_store(self, stats: Callable[[], Mapping[str, int | bool]]) -> None:
        """Export the resume store's counters (RESUME_STORE), read at scrape time."""
        if self.multiprocess_dir is None:
            ResumeStoreCollector(stats, self.registry)
        else:
            self._resume_counters = ResumeStoreCounters(stats, self.registry)

    async def publish_forever(self, every_s: float = 1.0) -> None:
        """Multiprocess mode: copy the resume store's counters into the shared files periodically,
        so a scrape of another worker sees this one's within ``every_s``."""
        while True:
            await asyncio.sleep(every_s)  # the publishing period, not synchronisation
            if self._resume_counters is not None:
                self._resume_counters.sync()

    def connection_closed_by_bridge(self, reason: ConnectionCloseReason) -> None:
        self._connections_closed.labels(reason).inc()

    def render(self) -> tuple[bytes, str]:
        """The text exposition body and its content type, for GET /metrics."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        if self._resume_counters is not None:
            self._resume_counters.sync()
        merged = CollectorRegistry()
        MultiProcessCollector(merged, str(self.multiprocess_dir))  # type: ignore[no-untyped-call]
        return generate_latest(merged), CONTENT_TYPE_LATEST


class PerValueHistogram:
    """``BatchHistogram``'s interface over prometheus-client's ``Histogram``, for multiprocess
    mode, where only prometheus-client's own metric types reach the shared files."""

    def __init__(self, name: str, documentation: str, *, buckets: Sequence[float], registry: CollectorRegistry) -> None:
        self._histogram = Histogram(name, documentation, buckets=buckets, registry=registry)

    def observe_many(self, values: Sequence[float]) -> None:
        for value in values:
            self._histogram.observe(value)


class ResumeStoreCounters:
    """Multiprocess mode: the resume store's counters as real counters, advanced by the difference
    since the last ``sync`` (the store keeps plain integers on its hot paths)."""

    def __init__(self, stats: Callable[[], Mapping[str, int | bool]], registry: CollectorRegistry) -> None:
        self._stats = stats
        self._registry = registry
        self._counters: dict[str, Counter] = {}
        self._seen: dict[str, int] = {}
        self._down = Gauge(
            "bridge_resume_store_down",
            "1 while the resume store is failing.",
            registry=registry,
            multiprocess_mode="livemax",
        )

    def sync(self) -> None:
        for name, value in self._stats().items():
            if name == "store_down":
                self._down.set(float(value))
                continue
            counter = self._counters.get(name)
            if counter is None:
                counter = self._counters[name] = Counter(
                    f"bridge_resume_store_{name}", f"Resume store: {name.replace('_', ' ')}.", registry=self._registry
                )
            delta = int(value) - self._seen.get(name, 0)
            if delta > 0:
                counter.inc(delta)
                self._seen[name] = int(value)


class BatchHistogram(Collector):
    """A histogram fed a batch of values at a time, for the per-token gaps.

    ``prometheus_client.Histogram.observe`` takes a lock and walks the bucket bounds in Python for
    every value, a per-token cost that shows as a share of a core at full token rate. Here a batch
    costs one C bisect per value and no lock: the histogram is only touched from the event loop,
    which also renders /metrics, so a scrape never sees half a batch. Exposed through the public
    custom-collector API, so the text format is still prometheus-client's own.
    """

    def __init__(self, name: str, documentation: str, *, buckets: Sequence[float], registry: CollectorRegistry) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = sorted(float(b) for b in buckets)
        self._counts = [0] * (len(self._bounds) + 1)  # the last one is +Inf
        self._sum = 0.0
        registry.register(self)

    def observe_many(self, values: Sequence[float]) -> None:
        counts, bounds = self._counts, self._bounds
        for value in values:
            counts[bisect_left(bounds, value)] += 1  # "le": a value equal to a bound is in it
        self._sum += sum(values)

    def collect(self) -> Iterator[Metric]:
        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for bound, count in zip([*self._bounds, float("inf")], self._counts, strict=True):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))  # type: ignore[no-untyped-call]
        yield HistogramMetricFamily(self._name, self._documentation, buckets=buckets, sum_value=self._sum)


class ResumeStoreCollector(Collector):
    """``bridge_resume_store_<counter>_total`` and ``bridge_resume_store_down`` from the store's stats.

    Read at scrape time from the one ``ResumeStore`` of the app, so the store keeps plain integer
    counters on its hot paths and /metrics still shows them.
    """

    def __init__(self, stats: Callable[[], Mapping[str, int | bool]], registry: CollectorRegistry) -> None:
        self._stats = stats
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        for name, value in self._stats().items():
            if name == "store_down":
                yield GaugeMetricFamily(
                    "bridge_resume_store_down", "1 while the resume store is failing.", value=float(value)
                )
            else:
                yield CounterMetricFamily(
                    f"bridge_resume_store_{name}", f"Resume store: {name.replace('_', ' ')}.", value=float(value)
                )
