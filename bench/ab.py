"""Interleaved A/B of bridge builds: did a change make the bridge faster on this noisy host?

    git worktree add /tmp/before HEAD~1
    python -m bench.ab --rounds 8 before=/tmp/before after=.            # first-token latency
    python -m bench.ab --rounds 5 --mode throughput before=/tmp/before after=.
    python -m bench.ab --peer before=/tmp/before after=.                 # and the reference peer
    python -m bench.ab --routes --rounds 20                              # native vs OpenAI route
    python -m bench.ab --routes --rounds 10 --mode throughput
    python -m bench.ab --rounds 6 --mode paced before=/tmp/before after=.  # tails under paced load

One stub, one bridge per source tree (each run from its own tree, pinned to core 1 like the bench's
system under test) and direct gRPC as the floor; every round runs the same load against each, in
turn, so a slow phase of the host hits all of them. Two ``make bench`` runs an hour apart can differ
by more than most single changes (bench/README.md says by how much); an interleaved A/B in one
invocation cancels that drift out.

``--mode paced`` holds ``--streams`` streams of a paced stub (a token every 25 ms, opened at 100 a
second) and compares the tails: first-token p99 and inter-token p99 per round. A pause of the
bridge's event loop (a long garbage collection, a blocking call) shows there and nowhere else: it
delays one gap of every stream, too few to move a p50, but every stream opening meanwhile.

``--routes`` compares the two faces of one bridge (this tree's) instead of two trees: the native
stream asked with a GET and with a JSON POST (the same request shape as the OpenAI route's), and
the OpenAI-compatible ``POST /v1/chat/completions`` (``bench.loadgen --route openai``),
interleaved the same way, each paired with the native GET of the same round.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from bench.procs import HttpServer, Loadgen, StubProc, start_bridge_from, start_peer
from bench.workload import FAST_REPEAT, words
from bzb_shared.childproc import ROOT

CPU_STUB, CPU_SUT = [0], [1]  # as in bench.run: the stub and the HTTP load generator share core 0
OPENAI_PATH = "/v1/chat/completions"
PACED_TOKEN_MS, PACED_TOKENS = 25, 200  # bench.workers' stream: 200 tokens over 5 s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.ab", description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="*", help="NAME=PATH of a source tree holding bridge/")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--mode", choices=("latency", "throughput", "paced"), default="latency")
    parser.add_argument("--streams", type=int, default=250, help="--mode paced: streams held at once")
    parser.add_argument("--peer", action="store_true", help="also measure the reference peer")
    parser.add_argument(
        "--routes", action="store_true", help="the native and the OpenAI-compatible route of this tree's bridge"
    )
    args = parser.parse_args(argv)
    if bool(args.trees) == args.routes:
        parser.error("name source trees, or --routes (which compares the routes of this tree)")
    trees = {name: Path(path).resolve() for name, path in (t.split("=", 1) for t in args.trees)}
    if args.routes:
        trees = {"bridge": ROOT}
    stub_args = ["--mode", "echo", "--repeat", str(FAST_REPEAT)]
    if args.mode == "latency":
        load = ["--query", words(50, FAST_REPEAT), "--concurrency", "1", "--requests", "100", "--warmup", "5"]
    elif args.mode == "throughput":
        load = ["--query", words(1000, FAST_REPEAT), "--concurrency", "16", "--requests", "32"]
    else:
        load = ["--query", words(PACED_TOKENS), "--concurrency", str(args.streams), "--ramp-s", str(args.streams / 100)]
        stub_args = ["--mode", "echo", "--token-delay-ms", str(PACED_TOKEN_MS)]

    stub = StubProc(stub_args, CPU_STUB)
    bridges: dict[str, HttpServer] = {}
    try:
        workdir = Path(tempfile.mkdtemp(prefix="bench-ab-"))
        for name, tree in trees.items():
            bridges[name] = start_bridge_from(tree, stub.target, CPU_SUT, workdir)
        if args.peer:
            bridges["peer"] = start_peer(stub.target, CPU_SUT)
        targets = {name: ["sse", "--url", server.stream_url] for name, server in bridges.items()}
        if args.routes:
            bridge = bridges["bridge"]
            targets = {
                "native": ["sse", "--url", bridge.stream_url],
                "native-post": ["sse", "--route", "native-post", "--url", bridge.stream_url],
                "openai": ["sse", "--route", "openai", "--url", bridge.url + OPENAI_PATH],
                **{name: argv for name, argv in targets.items() if name == "peer"},
            }
        samples: dict[str, list[float]] = {name: [] for name in [*targets, "direct"]}
        rounds: list[dict[str, float]] = []
        gaps: list[dict[str, float]] = []
        for _ in range(args.rounds):
            rounds.append({})
            gaps.append({})
            for name in samples:
                if name == "direct":
                    lg = Loadgen(["grpc", "--target", stub.target, *load], CPU_SUT)
                else:
                    lg = Loadgen([*targets[name], *load], CPU_STUB)
                result = lg.result(600)
                assert result["completed"] == result["streams"], (name, result["errors"], result["error_examples"])
                if args.mode == "latency":
                    samples[name].extend(result["first_token_ms_all"])
                    rounds[-1][name] = statistics.median(result["first_token_ms_all"])
                elif args.mode == "paced":
                    rounds[-1][name] = result["first_token_ms"]["p99"]
                    gaps[-1][name] = result["gap_ms"]["p99"]
                else:
                    samples[name].append(result["tokens_per_s"])
                    rounds[-1][name] = result["tokens_per_s"]
    finally:
        for server in bridges.values():
            server.stop()
        stub.stop()
    first = next(iter(targets))
    if args.mode == "paced":
        print(paired_tails("first-token p99", rounds, first))
        print(paired_tails("inter-token p99", gaps, first))
        return 0
    for name, values in samples.items():
        if args.mode == "latency":
            values.sort()
            p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
            print(f"{name:11s} first token ms p50 {statistics.median(values):.3f} p99 {p99:.3f} (n={len(values)})")
        else:
            print(
                f"{name:11s} tokens/s median {statistics.median(values):,.0f} "
                f"(rounds {', '.join(f'{v:,.0f}' for v in values)})"
            )
    print(paired_rounds(rounds, first=first) if args.mode == "latency" else paired_throughput(rounds, first=first))
    return 0


def paired_rounds(rounds: list[dict[str, float]], first: str) -> str:
    """Per round, each target's p50 minus direct gRPC's (ms); then, per target, the median of
    those and in how many rounds it added less than ``first`` (and than the peer, or than the
    native POST of ``--routes``, when measured)."""
    names = [name for name in rounds[0] if name != "direct"]
    added = {name: [r[name] - r["direct"] for r in rounds] for name in names}
    lines = ["added p50 over direct gRPC per round, ms:"]
    lines += [f"  {name:11s} " + " ".join(f"{v:+.3f}" for v in values) for name, values in added.items()]
    for name in names:
        line = f"  {name:11s} median added {statistics.median(added[name]):+.3f} ms"
        for other in dict.fromkeys((first, "peer", "native-post")):
            if other in added and other != name:
                wins = sum(a < b for a, b in zip(added[name], added[other], strict=True))
                ratios = [a / b for a, b in zip(added[name], added[other], strict=True) if b > 0]
                ratio = f", median ratio {statistics.median(ratios):.2f}" if ratios else ""
                line += f"; below {other} in {wins}/{len(rounds)} rounds{ratio}"
        lines.append(line)
    return "\n".join(lines)


def paired_tails(what: str, rounds: list[dict[str, float]], first: str) -> str:
    """Per round, each target's ``what`` (ms); its median, and in how many rounds it was below
    ``first``'s of the same round."""
    lines = [f"{what} per round, ms:"]
    for name in rounds[0]:
        values = [r[name] for r in rounds]
        line = f"  {name:11s} " + " ".join(f"{v:7.1f}" for v in values) + f"; median {statistics.median(values):.1f}"
        if name != first:
            wins = sum(r[name] < r[first] for r in rounds)
            line += f"; below {first} in {wins}/{len(rounds)} rounds"
        lines.append(line)
    return "\n".join(lines)


def paired_throughput(rounds: list[dict[str, float]], first: str) -> str:
    """Per round, each target's tokens/s over ``first``'s of the same round (and over the native
    POST's, with ``--routes``); their median and range."""
    lines = []
    for base in dict.fromkeys((first, "native-post")):
        if base not in rounds[0]:
            continue
        lines.append(f"tokens/s relative to {base} per round:")
        for name in [n for n in rounds[0] if n not in (first, base, "direct")]:
            ratios = [r[name] / r[base] for r in rounds if r[base] > 0]
            lines.append(
                f"  {name:11s} " + " ".join(f"{v:.3f}" for v in ratios) + f"; median {statistics.median(ratios):.3f}"
                f" (min {min(ratios):.3f}, max {max(ratios):.3f}); above {base} in "
                f"{sum(v > 1 for v in ratios)}/{len(ratios)} rounds"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
