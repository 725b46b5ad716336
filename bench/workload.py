"""The loads the benchmarks apply: the profile of a full or quick run, and queries of known length."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

FAST_REPEAT = 50  # the "fast" stub streams its query 50 times, so one stub serves 50 to 100 000 tokens


def words(n: int, repeat: int = 1) -> str:
    """An echo query that makes a stub with ``--repeat repeat`` stream exactly n word tokens."""
    if n % repeat:
        raise ValueError(f"{n} tokens is not a multiple of --repeat {repeat}")
    return "tok " * (n // repeat)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Profile:
    latency_rounds: int = 5
    latency_requests: int = 100  # per round and target
    latency_tokens: int = 50
    throughput_rounds: int = 3
    throughput_clients: int = 16
    throughput_streams_per_client: int = 2
    throughput_tokens: int = 1000
    paced_levels: list[int] = field(default_factory=lambda: [100, 250, 500, 750, 1000, 2000])
    paced_tokens: int = 200
    pacing_ms: float = 50.0
    idle_streams: int = 1000
    idle_hold_s: float = 4.0
    heartbeat_s: float = 1.0
    cancel_streams: int = 500
    cancel_after_tokens: int = 10
    slow_tokens: int = 100_000
    slow_stall_s: float = 10.0
    slow_after_tokens: int = 200


def quick_profile() -> Profile:
    """Tiny numbers for the CI smoke run: they show only that the harness works."""
    return Profile(
        latency_rounds=1,
        latency_requests=40,
        throughput_rounds=1,
        throughput_clients=4,
        throughput_streams_per_client=1,
        throughput_tokens=300,
        paced_levels=[10, 40],
        paced_tokens=10,
        pacing_ms=20.0,
        idle_streams=40,
        idle_hold_s=0.7,
        heartbeat_s=0.3,
        cancel_streams=40,
        cancel_after_tokens=3,
        slow_tokens=100_000,
        slow_stall_s=0.7,
        slow_after_tokens=50,
    )
