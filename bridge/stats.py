"""Live stream statistics for GET /api/v2/bali-zero/stream-stats, plus ``FanOut`` of observers.

Percentiles cover a sliding time window with bounded memory. The window is cut into at most
``MAX_BUCKETS`` time buckets; each bucket counts every sample but keeps at most ``samples_per_bucket``
of them, chosen by reservoir sampling (algorithm R), so the kept ones are a uniform sample of the
bucket. A percentile weights each kept sample by ``bucket count / kept``.

Accuracy: while no bucket overflows, percentiles are exact (nearest rank). Beyond that they are
estimates whose rank error shrinks like 1/sqrt(samples kept); with the defaults (60 buckets x 512)
p50/p95 are typically within a fraction of a percent in rank, p99 within about one percent. Samples
leave the window a whole bucket at a time, so the window is exact to one bucket width
(``window_s / 60``, at least 1 s). Memory is at most 2 x 60 x 512 floats whatever the load.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from bridge.types import StreamObserver, StreamResult

MAX_BUCKETS = 60
PERCENTILES = (("p50", 0.50), ("p95", 0.95), ("p99", 0.99))


class _Bucket:
    __slots__ = ("count", "index", "samples")

    def __init__(self, index: int) -> None:
        self.index = index
        self.count = 0
        self.samples: list[float] = []


class WindowedSamples:
    """Samples of one quantity over the last ``window_s`` seconds, reservoir-capped per bucket."""

    def __init__(self, window_s: float, clock: Callable[[], float], samples_per_bucket: int, seed: int) -> None:
        self._bucket_s = max(1.0, window_s / MAX_BUCKETS)
        self._keep = math.ceil(window_s / self._bucket_s)
        self._clock = clock
        self._cap = samples_per_bucket
        # Seeded: deterministic, and no shared global RNG state. random() is much cheaper than randrange().
        self._random = random.Random(seed).random
        self._buckets: deque[_Bucket] = deque()

    def add(self, value: float) -> None:
        self.add_many((value,))

    def add_many(self, values: Sequence[float]) -> None:
        """Add samples that arrived together: one clock read and bucket lookup for the batch."""
        index = int(self._clock() // self._bucket_s)
        buckets = self._buckets
        if not buckets or buckets[-1].index != index:
            buckets.append(_Bucket(index))
            self._expire(index)
        bucket = buckets[-1]
        samples, cap, rand = bucket.samples, self._cap, self._random
        count = bucket.count
        for value in values:
            count += 1
            if len(samples) < cap:
                samples.append(value)
            else:
                slot = int(rand() * count)
                if slot < cap:
                    samples[slot] = value
        bucket.count = count

    def _expire(self, now_index: int) -> None:
        while self._buckets and self._buckets[0].index <= now_index - self._keep:
            self._buckets.popleft()

    def summary(self, scale: float = 1.0) -> dict[str, Any]:
        """``count`` in the window and nearest-rank p50/p95/p99 (None when empty), times ``scale``."""
        return summarize([self.export()], scale)

    def export(self) -> list[tuple[int, int, list[float]]]:
        """The window's buckets as ``(index, count, kept samples)``, for ``summarize`` elsewhere.

        Bucket indices count ``bucket_s`` periods of the monotonic clock, which every process of
        one host shares, so the buckets of several workers line up.
        """
        self._expire(int(self._clock() // self._bucket_s))
        return [(b.index, b.count, list(b.samples)) for b in self._buckets]


def summarize(exports: Sequence[Sequence[Sequence[Any]]], scale: float = 1.0) -> dict[str, Any]:
    """``count`` and nearest-rank p50/p95/p99 (times ``scale``) over the buckets of one or several
    ``WindowedSamples.export()``: each kept sample weighs its bucket's count over its kept ones."""
    weighted: list[tuple[float, float]] = []
    total = 0
    for buckets in exports:
        for _index, count, samples in buckets:
            total += int(count)
            if samples:
                weight = count / len(samples)
                weighted.extend((float(value), weight) for value in samples)
    result: dict[str, Any] = {"count": total}
    weighted.sort()
    for name, q in PERCENTILES:
        result[name] = _weighted_rank(weighted, q * total) * scale if weighted else None
    return result


def _weighted_rank(weighted: list[tuple[float, float]], rank: float) -> float:
    """Smallest value whose cumulative weight reaches ``rank`` (nearest-rank percentile)."""
    target = max(math.ceil(rank - 1e-9), 1)
    cumulative = 0.0
    for value, weight in weighted:
        cumulative += weight
        if cumulative >= target - 1e-9:
            return value
    return weighted[-1][0]


class StreamStats:
    """Counts and latency percentiles of streams; a StreamObserver. Single event-loop use only."""

    def __init__(
        self, window_s: float, clock: Callable[[], float] = time.monotonic, samples_per_bucket: int = 512
    ) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be > 0")
        self.window_s = window_s
        self._first_token = WindowedSamples(window_s, clock, samples_per_bucket, seed=1)
        self._inter_token = WindowedSamples(window_s, clock, samples_per_bucket, seed=2)
        self._open = 0
        self._opened = 0
        self._outcomes: Counter[str] = Counter()
        self._error_codes: Counter[str] = Counter()
        self._reconnections = 0

    def stream_opened(self) -> None:
        self._open += 1
        self._opened += 1

    def first_token(self, seconds: float) -> None:
        self._first_token.add(seconds)

    def token_gaps(self, seconds: Sequence[float]) -> None:
        self._inter_token.add_many(seconds)

    def stream_closed(self, result: StreamResult) -> None:
        self._open -= 1
        self._outcomes[result.outcome] += 1
        if result.error_code:
            self._error_codes[result.error_code] += 1

    def reconnected(self) -> None:
        self._reconnections += 1

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready: totals since start, and latency percentiles in ms over the window."""
        return merge_snapshots(self.window_s, [self.export()])

    def export(self) -> dict[str, Any]:
        """This process's counts and window samples, JSON-ready, for ``merge_snapshots``."""
        return {
            "open_streams": self._open,
            "streams_opened": self._opened,
            "outcomes": dict(self._outcomes),
            "error_codes": dict(self._error_codes),
            "reconnections": self._reconnections,
            "first_token": self._first_token.export(),
            "inter_token": self._inter_token.export(),
        }


def merge_snapshots(window_s: float, exports: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The snapshot of several processes' ``StreamStats.export()``: counts added, percentiles over
    the union of their samples (one process: exactly its own ``snapshot``)."""
    outcomes: Counter[str] = Counter()
    error_codes: Counter[str] = Counter()
    for part in exports:
        outcomes.update(part["outcomes"])
        error_codes.update(part["error_codes"])
    return {
        "window_s": window_s,
        "open_streams": sum(int(part["open_streams"]) for part in exports),
        "streams_opened": sum(int(part["streams_opened"]) for part in exports),
        "outcomes": {k: outcomes.get(k, 0) for k in ("completed", "cancelled", "error")},
        "error_codes": dict(error_codes),
        "reconnections": sum(int(part["reconnections"]) for part in exports),
        "first_token_ms": summarize([part["first_token"] for part in exports], 1000.0),
        "inter_token_ms": summarize([part["inter_token"] for part in exports], 1000.0),
    }


class FanOut:
    """Passes every observation to several observers (e.g. metrics and stats) in order."""

    def __init__(self, *observers: StreamObserver) -> None:
        self._observers = observers

    def stream_opened(self) -> None:
        for o in self._observers:
            o.stream_opened()

    def first_token(self, seconds: float) -> None:
        for o in self._observers:
            o.first_token(seconds)

    def token_gaps(self, seconds: Sequence[float]) -> None:
        for o in self._observers:
            o.token_gaps(seconds)

    def stream_closed(self, result: StreamResult) -> None:
        for o in self._observers:
            o.stream_closed(result)

    def reconnected(self) -> None:
        for o in self._observers:
            o.reconnected()
