"""A bridge's resident memory per stream: many short SSE streams, VmRSS sampled as they go.

Memory per stream, not per second: on a loaded machine fewer streams run per second, but each
one still costs what it costs, so the slope of VmRSS over streams started is what tells a leak
from a slow host. Most streams are cut after their first token (the disconnect path: the bridge
cancels the upstream call), the rest read to ``done``: both ends of a stream's life are covered.

Used by tests/e2e/test_memory_streams.py; ``python -m tests.support.stream_rss URL PID`` prints the
same figures for a bridge started by hand (elimination runs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit

from bzb_shared.fit import least_squares_slope

STREAM_PATH = "/api/v2/bali-zero/chat-stream"
QUERY = quote(" ".join(f"w{i}" for i in range(12)))


def vm_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass
class Run:
    streams: int
    warmup: int
    every: int
    parallel: int
    users: int = 50  # distinct x-user-id values, cycled (per-user maps see this many keys)
    full_every: int = 3  # one stream in this many reads to ``done`` (0: none); the others disconnect early
    samples: list[tuple[int, int]] = field(default_factory=list)  # (streams finished, VmRSS KiB)
    statuses: dict[int, int] = field(default_factory=dict)
    done_frames: int = 0

    @property
    def bytes_per_stream(self) -> float:
        """Least-squares slope of VmRSS over streams finished, over all samples."""
        return _bytes_per_stream(self.samples)

    @property
    def steady_bytes_per_stream(self) -> float:
        """The smaller of the slopes fitted over each half of the samples.

        A leak costs the same in every stream, so it shows in both halves. A bounded cache that
        finishes filling, or one allocator arena step, lands in one half only: on a clean bridge
        that alone can push the whole-run slope past a leak's bound.
        """
        half = len(self.samples) // 2
        return min(_bytes_per_stream(self.samples[:half]), _bytes_per_stream(self.samples[half:]))

    def summary(self) -> dict[str, object]:
        return {
            "streams": self.streams,
            "warmup": self.warmup,
            "statuses": self.statuses,
            "done_frames": self.done_frames,
            "bytes_per_stream": round(self.bytes_per_stream, 1),
            "steady_bytes_per_stream": round(self.steady_bytes_per_stream, 1),
            "rss_kib_first": self.samples[0][1] if self.samples else None,
            "rss_kib_last": self.samples[-1][1] if self.samples else None,
        }


def _bytes_per_stream(samples: Sequence[tuple[int, int]]) -> float:
    return least_squares_slope([float(n) for n, _ in samples], [float(kib) for _, kib in samples]) * 1024


async def one_stream(host: str, port: int, index: int, run: Run) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(
            f"GET {STREAM_PATH}?query={QUERY} HTTP/1.1\r\nHost: {host}\r\n"
            f"Accept: text/event-stream\r\nx-user-id: rss{index % run.users}\r\n\r\n".encode("ascii")
        )
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        run.statuses[status] = run.statuses.get(status, 0) + 1
        if status != 200:
            return
        full = run.full_every > 0 and index % run.full_every == 0
        seen = b""
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                return
            seen = (seen + chunk)[-4096:]
            if b'"type":"done"' in seen:
                run.done_frames += 1
                return
            if not full and b'"type":"token"' in seen:
                return  # disconnect mid-stream: the bridge must cancel the upstream call
    finally:
        writer.close()


async def drive(url: str, pid: int, run: Run) -> Run:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    counter = iter(range(run.streams))
    finished = 0

    async def worker() -> None:
        nonlocal finished
        for index in counter:
            await asyncio.wait_for(one_stream(host, port, index, run), 30)
            finished += 1
            if finished > run.warmup and finished % run.every == 0:
                run.samples.append((finished, vm_rss_kib(pid)))

    await asyncio.gather(*(worker() for _ in range(run.parallel)))
    return run


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tests.support.stream_rss", description=__doc__.split("\n\n")[0])
    p.add_argument("url")
    p.add_argument("pid", type=int)
    p.add_argument("--streams", type=int, default=8000)
    p.add_argument("--warmup", type=int, default=2000)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--parallel", type=int, default=40)
    a = p.parse_args(argv)
    run = asyncio.run(drive(a.url, a.pid, Run(a.streams, a.warmup, a.every, a.parallel)))
    sys.stdout.write(json.dumps(run.summary()) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
