"""Real processes for tests: the stub RAG server and the bridge, each on a free loopback port.

Both print a "listening" line when ready, so tests wait for that line instead of sleeping.
The stub's stream-end JSON lines are collected so a test can await "request X ended as Y".
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[2]
_STUB_READY = re.compile(r"^rag-stub listening on (\S+):(\d+)$")
_BRIDGE_READY = re.compile(r"^bali-zero-bridge listening on (http://\S+)$")


T = TypeVar("T")


def with_port_retries(start: Callable[[], T], attempts: int = 3) -> T:
    """Start a server on a probed free port, again when another process took the port first.

    Servers that pick their own port (``--port 0``) never need this; those given a probed port
    (redis-server, nginx) raise RuntimeError when the bind loses the race.
    """
    for attempt in range(attempts):
        try:
            return start()
        except RuntimeError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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

    def output(self) -> str:
        return "\n".join(self.lines[-20:] + self.stderr_lines[-40:])

    def wait_for_line(self, predicate: Any, timeout: float = 10) -> str:
        """Block until a stdout line satisfies ``predicate``; return it."""
        with self._cond:
            found: list[str] = []

            def check() -> bool:
                found[:] = [line for line in self.lines if predicate(line)][:1]
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


class Stub(Process):
    ready_pattern = _STUB_READY

    def __init__(self, *args: str, env: Mapping[str, str] | None = None, port: int = 0) -> None:
        argv = [sys.executable, "-m", "rag_stub", "--port", str(port), *args]
        super().__init__(argv, base_env(env), ROOT)
        self.port = int(self.ready.group(2))
        self.target = f"127.0.0.1:{self.port}"

    def stream_ends(self) -> list[dict[str, Any]]:
        with self._cond:
            return [json.loads(x) for x in self.lines if x.startswith('{"event":"stream_end"')]

    def wait_for_end(self, request_id: str | None = None, timeout: float = 10) -> dict[str, Any]:
        """The stream-end record of ``request_id`` (or of the next stream to end when None)."""
        seen = len(self.stream_ends()) if request_id is None else 0

        def match(line: str) -> bool:
            return line.startswith('{"event":"stream_end"') and (
                request_id is None or json.loads(line)["request_id"] == request_id
            )

        if request_id is None:
            deadline = time.monotonic() + timeout
            with self._cond:
                self._cond.wait_for(lambda: len(self.stream_ends()) > seen, max(0, deadline - time.monotonic()))
            ends = self.stream_ends()
            if len(ends) <= seen:
                raise TimeoutError(f"no stream ended within {timeout}s")
            return ends[seen]
        return dict(json.loads(self.wait_for_line(match, timeout)))


    async def ended(self, request_id: str | None = None, timeout: float = 10) -> dict[str, Any]:
        """``wait_for_end`` for async tests: waits on a thread so the event loop keeps running."""
        return await asyncio.to_thread(self.wait_for_end, request_id, timeout)


class Bridge(Process):
    ready_pattern = _BRIDGE_READY

    def __init__(self, env: Mapping[str, str], *args: str, cwd: Path | None = None) -> None:
        argv = [sys.executable, "-m", "bridge", "--port", "0", *args]
        super().__init__(argv, base_env(env), cwd or ROOT)
        self.url = self.ready.group(1)
        self.port = int(self.url.rsplit(":", 1)[1])
