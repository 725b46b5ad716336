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
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from bench.run import FAST_REPEAT, words

ROOT = Path(__file__).resolve().parents[1]
STREAM_PATH = "/api/v2/bali-zero/chat-stream"


def _spawn(argv: list[str], cwd: Path, env: dict[str, str], ready: str) -> tuple[subprocess.Popen[str], re.Match[str]]:
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        match = re.search(ready, line)
        if match:
            drain = threading.Thread(target=proc.stdout.read, daemon=True)  # never block on a full pipe
            drain.start()
            return proc, match
    raise SystemExit(f"{argv[-3:]} exited before it was ready (code {proc.wait()})")


def _loadgen(args: list[str], cpus: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.loadgen", *args, "--cpus", cpus],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=True,
    ).stdout
    return dict(json.loads([line for line in out.splitlines() if line.startswith('{"event":"result"')][-1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.ab", description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="+", help="NAME=PATH of a source tree holding bridge/")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--mode", choices=("latency", "throughput"), default="latency")
    args = parser.parse_args(argv)
    trees = {name: Path(path).resolve() for name, path in (t.split("=", 1) for t in args.trees)}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "RAG_"))}
    procs: list[subprocess.Popen[str]] = []
    try:
        stub, ready = _spawn(
            [sys.executable, "-m", "bench.pin", "0", "-m", "rag_stub", "--port", "0", "--mode", "echo",
             "--repeat", str(FAST_REPEAT)],
            ROOT, env, r"listening on (\S+):(\d+)",
        )
        procs.append(stub)
        target = f"127.0.0.1:{ready.group(2)}"
        workdir = tempfile.mkdtemp(prefix="bench-ab-")
        urls: dict[str, str] = {}
        for name, tree in trees.items():
            bridge_env = {
                **env, "RAG_TARGET": target, "ENABLE_SSE_STREAMING": "true", "LOG_LEVEL": "WARNING",
                "AUDIT_DB": f"{workdir}/{name}.sqlite3", "RATE_LIMIT": "1000000/second",
                "MAX_STREAMS_PER_USER": "1000000", "MAX_STREAMS_TOTAL": "1000000",
            }
            proc, ready = _spawn([sys.executable, "-m", "bench.pin", "1", "-m", "bridge", "--port", "0"], tree,
                                 bridge_env, r"listening on (http://\S+)")
            procs.append(proc)
            urls[name] = ready.group(1) + STREAM_PATH
        if args.mode == "latency":
            load = ["--query", words(50, FAST_REPEAT), "--concurrency", "1", "--requests", "100", "--warmup", "5"]
        else:
            load = ["--query", words(1000, FAST_REPEAT), "--concurrency", "16", "--requests", "32"]
        samples: dict[str, list[float]] = {name: [] for name in [*urls, "direct"]}
        for _ in range(args.rounds):
            for name in samples:
                if name == "direct":
                    result = _loadgen(["grpc", "--target", target, *load], "1")
                else:
                    result = _loadgen(["sse", "--url", urls[name], *load], "0")
                if args.mode == "latency":
                    samples[name].extend(result["first_token_ms_all"])
                else:
                    samples[name].append(result["tokens_per_s"])
        for name, values in samples.items():
            if args.mode == "latency":
                values.sort()
                p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
                print(f"{name:10s} first token ms p50 {statistics.median(values):.3f} p99 {p99:.3f} (n={len(values)})")
            else:
                print(f"{name:10s} tokens/s median {statistics.median(values):,.0f} "
                      f"(rounds {', '.join(f'{v:,.0f}' for v in values)})")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
