"""The processes a benchmark runs: stubs, our bridge, the reference peer and load generators.

Built on bzb_shared/childproc.py (each child prints a ready line; stdout lines are kept).
Every child can be pinned to CPUs through ``bench.pin`` (affinity set before exec).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

from bzb_shared.childproc import ROOT, Process, base_env

STUB_READY = re.compile(r"^rag-stub listening on (\S+):(\d+)$")
BRIDGE_READY = re.compile(r"^bali-zero-bridge listening on (http://\S+)$")
PEER_READY = re.compile(r"^reference-bridge listening on (http://\S+)$")
LOADGEN_READY = re.compile(r'^\{"event":"start"')
REDIS_READY = re.compile(r".*Ready to accept connections")
STREAM_PATH = "/api/v2/bali-zero/chat-stream"


def python_argv(module: str, args: Sequence[str], cpus: Sequence[int] | None) -> list[str]:
    if cpus:
        return [sys.executable, "-m", "bench.pin", ",".join(map(str, cpus)), "-m", module, *args]
    return [sys.executable, "-m", module, *args]


def bridge_available() -> bool:
    return importlib.util.find_spec("bridge.__main__") is not None or importlib.util.find_spec("bridge.cli") is not None


class Child(Process):
    """A child process with a ready line given per instance, and psutil views of it."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: Mapping[str, str],
        ready: re.Pattern[str],
        ready_timeout: float = 30,
        cwd: Path = ROOT,
    ) -> None:
        self.name = name
        self.ready_pattern = ready
        super().__init__(argv, env, cwd, ready_timeout=ready_timeout)
        self.ps = psutil.Process(self.proc.pid)

    def cpu_s(self) -> float:
        t = self.ps.cpu_times()
        return float(t.user + t.system)

    def rss(self) -> int:
        return int(self.ps.memory_info().rss)


class RedisProc(Process):
    ready_pattern = REDIS_READY

    def __init__(self, port: int) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed (make system-deps installs it)")
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        super().__init__(argv, base_env(), ROOT)
        self.url = f"redis://127.0.0.1:{port}/0"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class StubProc(Child):
    def __init__(self, args: Sequence[str], cpus: Sequence[int] | None, port: int = 0) -> None:
        argv = python_argv("rag_stub", ["--port", str(port), *args], cpus)
        super().__init__("stub", argv, base_env(), STUB_READY)
        self.target = f"127.0.0.1:{self.ready.group(2)}"
        self._parsed = 0
        self._ends: dict[str, dict[str, Any]] = {}

    def ends(self) -> dict[str, dict[str, Any]]:
        """request_id -> stream_end record, for every stream ended so far (parsed incrementally)."""
        new = self.lines_from(self._parsed)
        self._parsed += len(new)
        for line in new:
            if line.startswith('{"event":"stream_end"'):
                record = json.loads(line)
                self._ends[record["request_id"]] = record
        return self._ends


class HttpServer(Child):
    def __init__(
        self, name: str, argv: list[str], env: Mapping[str, str], ready: re.Pattern[str], cwd: Path = ROOT
    ) -> None:
        super().__init__(name, argv, env, ready, cwd=cwd)
        self.url = self.ready.group(1)
        self.stream_url = self.url + STREAM_PATH


def start_bridge(target: str, cpus: Sequence[int] | None, workdir: Path, **env: str) -> HttpServer:
    return _start_bridge(ROOT, target, cpus, workdir, env)


def start_bridge_from(source: Path, target: str, cpus: Sequence[int] | None, workdir: Path) -> HttpServer:
    """The bridge of another source tree (a worktree of an older commit), for bench.ab."""
    return _start_bridge(source, target, cpus, workdir, {})


def _start_bridge(
    source: Path, target: str, cpus: Sequence[int] | None, workdir: Path, env: Mapping[str, str]
) -> HttpServer:
    argv = python_argv("bridge", ["--port", "0"], cpus)
    return HttpServer("bridge", argv, base_env(_bridge_env(target, workdir, env)), BRIDGE_READY, cwd=source)


def _bridge_env(target: str, workdir: Path, env: Mapping[str, str]) -> dict[str, str]:
    return {
        "RAG_TARGET": target,
        "ENABLE_SSE_STREAMING": "true",
        "AUDIT_DB": str(workdir / f"audit-{time.monotonic_ns()}.sqlite3"),
        "LOG_LEVEL": "WARNING",
        # A load test is one anonymous client with thousands of streams: lift the per-user limits.
        "RATE_LIMIT": "1000000/second",
        "CONTROL_RATE_LIMIT": "1000000/second",
        "MAX_STREAMS_PER_USER": "1000000",
        "MAX_STREAMS_TOTAL": "1000000",
        **env,
    }


def start_traced_bridge(target: str, probes: Path, frames: int, workdir: Path, **env: str) -> HttpServer:
    """The bridge under ``bench.lab.memtrace``: memory probes into ``probes`` on each SIGUSR2
    (tracemalloc too when ``frames`` > 0)."""
    argv = python_argv("bench.lab.memtrace", [str(probes), str(frames), "--", "--port", "0"], None)
    return HttpServer("bridge", argv, base_env(_bridge_env(target, workdir, env)), BRIDGE_READY)


def start_probed(server: str, out: Path, target: str, cpus: Sequence[int] | None, workdir: Path) -> HttpServer:
    """The bridge or the peer under ``bench.lab.probes`` (the first-token timeline), writing ``out`` at exit."""
    argv = python_argv("bench.lab.probes", [str(out), server, "--port", "0"], cpus)
    if server == "bridge":
        return HttpServer("bridge", argv, base_env(_bridge_env(target, workdir, {})), BRIDGE_READY)
    return HttpServer("peer", argv, base_env({"RAG_TARGET": target}), PEER_READY)


def start_peer(target: str, cpus: Sequence[int] | None, **env: str) -> HttpServer:
    full = {"RAG_TARGET": target, **env}
    argv = python_argv("bench.peers.reference_bridge", ["--port", "0"], cpus)
    return HttpServer("peer", argv, base_env(full), PEER_READY)


class Loadgen(Child):
    def __init__(self, args: Sequence[str], cpus: Sequence[int] | None) -> None:
        # The load generator pins itself (--cpus) first thing: one interpreter start instead of two.
        pin = ["--cpus", ",".join(map(str, cpus))] if cpus else []
        super().__init__("loadgen", python_argv("bench.loadgen", [*args, *pin], None), base_env(), LOADGEN_READY)

    def event(self, name: str, timeout: float) -> dict[str, Any]:
        prefix = '{"event":"' + name + '"'
        line = self.wait_for_line(lambda x: x.startswith(prefix), timeout)
        return dict(json.loads(line))

    def result(self, timeout: float) -> dict[str, Any]:
        try:
            return self.event("result", timeout)
        finally:
            try:
                self.proc.wait(10)
            except Exception:
                self.kill()


def in_parallel(factories: Mapping[str, Callable[[], Any]]) -> dict[str, Any]:
    """Start several children at once (each waits for its own ready line on a thread)."""
    results: dict[str, Any] = {}
    errors: dict[str, BaseException] = {}

    def run(name: str, factory: Callable[[], Any]) -> None:
        try:
            results[name] = factory()
        except BaseException as exc:
            errors[name] = exc

    threads = [threading.Thread(target=run, args=item, daemon=True) for item in factories.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        for child in results.values():
            if isinstance(child, Process):
                child.stop()
        name, exc = next(iter(errors.items()))
        raise RuntimeError(f"could not start {name}: {exc}") from exc
    return results


class Sampler:
    """Samples a process's RSS on a thread every ``interval`` seconds (bounded by ``max_samples``)."""

    def __init__(self, child: Child, interval: float = 0.05, max_samples: int = 20_000) -> None:
        self.child, self.interval, self.max_samples = child, interval, max_samples
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set() and len(self.samples) < self.max_samples:
            try:
                self.samples.append((time.time(), self.child.rss()))
            except psutil.Error:
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
