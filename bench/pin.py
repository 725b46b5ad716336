"""Run a Python module pinned to a set of CPUs: ``python -m bench.pin 0,1 -m rag_stub --port 0``.

The affinity is set before ``exec``, so every thread the program starts later (gRPC's pollers,
the event loop's executor) inherits it; pinning a running process by pid would only move the
thread that happens to have that id.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit("usage: python -m bench.pin CPU[,CPU...] PYTHON-ARGS...")
    cpus = {int(c) for c in sys.argv[1].split(",") if c.strip()}
    if cpus:
        os.sched_setaffinity(0, cpus)
    os.execv(sys.executable, [sys.executable, *sys.argv[2:]])


if __name__ == "__main__":
    main()
