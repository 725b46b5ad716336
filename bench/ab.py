"""Interleaved A/B of bridge builds: did a change make the bridge faster on this noisy host?

    git worktree add /tmp/before HEAD~1
    python -m bench.ab --rounds 8 before=/tmp/before after=.            # first-token latency
    python -m bench.ab --rounds 5 --mode throughput before=/tmp/before after=.

One stub, one bridge per source tree (each run from its own tree, pinned to core 1 like the bench's
system under test) and direct gRPC as the floor; every round runs the same load against each, in
turn, so a slow phase of the host hits all of them. Two ``make bench`` runs an hour apart differ by
more than most single changes (per-token CPU moved by 25 % on the development VM); an interleaved
A/B in one invocation does not.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from bench.procs import HttpServer, Loadgen, StubProc, start_bridge_from
from bench.run import FAST_REPEAT, words

CPU_STUB, CPU_SUT = [0], [1]  # as in bench.run: the stub and the HTTP load generator share core 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.ab", description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="+", help="NAME=PATH of a source tree holding bridge/")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--mode", choices=("latency", "throughput"), default="latency")
    args = parser.parse_args(argv)
    trees = {name: Path(path).resolve() for name, path in (t.split("=", 1) for t in args.trees)}
    if args.mode == "latency":
        load = ["--query", words(50, FAST_REPEAT), "--concurrency", "1", "--requests", "100", "--warmup", "5"]
    else:
        load = ["--query", words(1000, FAST_REPEAT), "--concurrency", "16", "--requests", "32"]

    stub = StubProc(["--mode", "echo", "--repeat", str(FAST_REPEAT)], CPU_STUB)
    bridges: dict[str, HttpServer] = {}
    try:
        workdir = Path(tempfile.mkdtemp(prefix="bench-ab-"))
        for name, tree in trees.items():
            bridges[name] = start_bridge_from(tree, stub.target, CPU_SUT, workdir)
        samples: dict[str, list[float]] = {name: [] for name in [*bridges, "direct"]}
        for _ in range(args.rounds):
            for name in samples:
                if name == "direct":
                    lg = Loadgen(["grpc", "--target", stub.target, *load], CPU_SUT)
                else:
                    lg = Loadgen(["sse", "--url", bridges[name].stream_url, *load], CPU_STUB)
                result = lg.result(600)
                if args.mode == "latency":
                    samples[name].extend(result["first_token_ms_all"])
                else:
                    samples[name].append(result["tokens_per_s"])
    finally:
        for server in bridges.values():
            server.stop()
        stub.stop()
    for name, values in samples.items():
        if args.mode == "latency":
            values.sort()
            p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
            print(f"{name:10s} first token ms p50 {statistics.median(values):.3f} p99 {p99:.3f} (n={len(values)})")
        else:
            print(f"{name:10s} tokens/s median {statistics.median(values):,.0f} "
                  f"(rounds {', '.join(f'{v:,.0f}' for v in values)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
