"""A child process that announces readiness with a line on stdout, whose output is kept.

Shared by the tests (tests/support) and the benchmarks (bench/), which must not import each
other: both start the stub and the bridge as real processes and wait for their "listening" line
instead of sleeping.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def base_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "ENABLE_SSE", "RAG_", "AUDIT_"))}
    env.update({"PYTHONUNBUFFERED": "1", "OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none"})
    env.update(extra or {})
    return env


class Process:
    """A child process whose stdout lines are read on a thread and kept."""

    ready_pattern: re.Pattern[str]

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], cwd: Path, ready_timeout: float = 20) -> None:
        self.argv = list(argv)
        self.proc = subprocess.Popen(
            self.argv,
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
        )
        self.lines: list[str] = []
        self.stderr_lines: list[str] = []
        self._cond = threading.Condition()
        self._ready: re.Match[str] | None = None
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr_lines), daemon=True).start()
        with self._cond:
            if not self._cond.wait_for(lambda: self._ready is not None or self.proc.poll() is not None, ready_timeout):
                self.kill()
                raise TimeoutError(f"{self.argv[:3]} not ready: {self.output()}")
        if self._ready is None:
            time.sleep(0.1)
            raise RuntimeError(f"{self.argv[:3]} exited with {self.proc.returncode}: {self.output()}")

    def _pump(self, stream: Any, sink: list[str]) -> None:
        for line in stream:
            line = line.rstrip("\n")
            with self._cond:
                sink.append(line)
                if self._ready is None and sink is self.lines:
                    self._ready = self.ready_pattern.match(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def ready(self) -> re.Match[str]:
        assert self._ready is not None
        return self._ready

    def lines_from(self, start: int = 0) -> list[str]:
        """A copy of the stdout lines kept so far, from index ``start`` (taken under the reader's lock)."""
        with self._cond:
            return self.lines[start:]

    def output(self) -> str:
        return "\n".join(self.lines[-20:] + self.stderr_lines[-40:])

    def wait_for_line(self, predicate: Any, timeout: float = 10, *, stderr: bool = False) -> str:
        """Block until a stdout (or, with ``stderr``, a stderr) line satisfies ``predicate``; return it."""
        lines = self.stderr_lines if stderr else self.lines
        with self._cond:
            found: list[str] = []

            def check() -> bool:
                found[:] = [line for line in lines if predicate(line)][:1]
                return bool(found) or self.proc.poll() is not None

            self._cond.wait_for(check, timeout)
        if not found:
            raise TimeoutError(f"no matching line within {timeout}s: {self.output()}")
        return found[0]

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout: float = 10) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
