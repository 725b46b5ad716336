"""The processes a benchmark needs, pinned to cores, and the load generator runs against them.

Scenarios (``bench/scenarios.py``) say what load to apply and what to keep; this module owns how:
which stub flags a group of servers shares, which core each process gets, and the interleaving
that makes a noisy phase of the host hit every target instead of one.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.procs import HttpServer, Loadgen, StubProc, in_parallel, start_bridge, start_peer
from bench.results import LoadgenResult
from bench.workload import FAST_REPEAT, Profile, log

HTTP_TARGETS = ("bridge", "peer")


@dataclass(frozen=True, slots=True)
class GroupSpec:
    """One stub (its flags shape every stream) and the settings of the servers in front of it."""

    stub_args: tuple[str, ...]
    bridge_env: dict[str, str]
    peer_env: dict[str, str]


@dataclass(slots=True)
class Group:
    stub: StubProc
    servers: dict[str, HttpServer]


@dataclass(frozen=True, slots=True)
class Cores:
    """Two cores: the system under test (bridge, peer or direct gRPC client) gets one alone; the stub
    and the HTTP load generator share the other. Empty lists: no pinning."""

    stub: list[int]
    system_under_test: list[int]
    http_loadgen: list[int]

    @classmethod
    def plan(cls, pin: bool) -> Cores:
        cpus = sorted(os.sched_getaffinity(0))
        if not pin or len(cpus) < 2:
            return cls([], [], [])
        return cls([cpus[0]], [cpus[1]], [cpus[2]] if len(cpus) >= 3 else [cpus[0]])

    @property
    def pinned(self) -> bool:
        return bool(self.system_under_test)


class Harness:
    def __init__(self, profile: Profile, quick: bool, cores: Cores, workdir: Path, targets: list[str]) -> None:
        self.profile = profile
        self.quick = quick
        self.cores = cores
        self.workdir = workdir
        self.targets = targets
        self.kept: dict[str, Group] = {}
        self.settle_s = 0.05 if quick else 0.5  # pause between runs so sockets and streams wind down

    @property
    def http_targets(self) -> list[str]:
        return [t for t in self.targets if t in HTTP_TARGETS]

    def settle(self) -> None:
        time.sleep(self.settle_s)

    # -- process groups ---------------------------------------------------------------------------
    # Full runs start a group per scenario and stop it after; quick runs start every group at once
    # (in parallel: start-up dominates a smoke run) and keep them until the end.

    def specs(self) -> dict[str, GroupSpec]:
        heartbeat = {"HEARTBEAT_INTERVAL_S": str(self.profile.heartbeat_s)}
        return {
            "fast": GroupSpec(("--repeat", str(FAST_REPEAT)), {}, {}),
            "paced": GroupSpec(("--token-delay-ms", str(self.profile.pacing_ms)), {}, {}),
            "idle": GroupSpec(("--first-token-delay-ms", "600000"), heartbeat, heartbeat),
        }

    def _server_factories(self, name: str, target: str) -> dict[str, Callable[[], HttpServer]]:
        spec = self.specs()[name]
        cpus = self.cores.system_under_test or None
        factories: dict[str, Callable[[], HttpServer]] = {}
        if "bridge" in self.targets:
            factories["bridge"] = functools.partial(start_bridge, target, cpus, self.workdir, **spec.bridge_env)
        if "peer" in self.targets:
            factories["peer"] = functools.partial(start_peer, target, cpus, **spec.peer_env)
        return factories

    def _stub(self, name: str) -> Callable[[], StubProc]:
        args = ["--mode", "echo", *self.specs()[name].stub_args]
        return functools.partial(StubProc, args, self.cores.stub or None)

    def prestart(self, names: list[str]) -> None:
        """Start the named groups at once: every stub, then every server (a gRPC channel that first
        finds its target down backs off for a second or more, so servers start after the stubs)."""
        stubs: dict[str, StubProc] = in_parallel({n: self._stub(n) for n in names})
        factories: dict[str, Callable[[], Any]] = {
            f"{n}/{kind}": factory
            for n in names
            for kind, factory in self._server_factories(n, stubs[n].target).items()
        }
        try:
            servers = in_parallel(factories)
        except BaseException:
            for stub in stubs.values():
                stub.stop()
            raise
        for n in names:
            mine = {key.split("/", 1)[1]: server for key, server in servers.items() if key.startswith(n + "/")}
            self.kept[n] = Group(stubs[n], mine)

    def group(self, name: str) -> Group:
        if name in self.kept:
            return self.kept[name]
        stub = self._stub(name)()
        try:
            servers = in_parallel(dict(self._server_factories(name, stub.target)))
        except BaseException:
            stub.stop()
            raise
        return Group(stub, servers)

    def release(self, group: Group) -> None:
        """Stop a group started for one scenario (kept groups live until ``stop_all``)."""
        if any(group.stub is kept.stub for kept in self.kept.values()):
            return
        for server in group.servers.values():
            server.stop()
        group.stub.stop()

    def stop_all(self) -> None:
        kept, self.kept = self.kept, {}
        t0 = time.monotonic()
        children = [c for g in kept.values() for c in (*g.servers.values(), g.stub)]
        in_parallel({f"{i}": c.stop for i, c in enumerate(children)})
        log(f"stopped {len(children)} processes in {time.monotonic() - t0:.1f} s")

    # -- load generator runs ----------------------------------------------------------------------

    def loadgen(self, target: str, group: Group, *args: str) -> Loadgen:
        if target == "direct":
            return Loadgen(["grpc", "--target", group.stub.target, *args], self.cores.system_under_test or None)
        return Loadgen(["sse", "--url", group.servers[target].stream_url, *args], self.cores.http_loadgen or None)

    def run(self, target: str, group: Group, *args: str, timeout: float) -> LoadgenResult:
        """Run one load generator to its end; the server's and the stub's CPU over the run are added."""
        server = group.servers.get(target)
        server_cpu0 = server.cpu_s() if server else None
        stub_cpu0 = group.stub.cpu_s()
        result = LoadgenResult.from_json(self.loadgen(target, group, *args).result(timeout))
        if server is not None and server_cpu0 is not None:
            result.server_cpu_s = server.cpu_s() - server_cpu0
        result.stub_cpu_s = group.stub.cpu_s() - stub_cpu0
        return result

    def interleaved(self, scenario: str, rounds: int, group: Group, args: list[str]) -> dict[str, list[LoadgenResult]]:
        """``rounds`` runs of the same load per target, targets interleaved within each round, so
        a slow phase of a noisy host hits every target rather than one."""
        per: dict[str, list[LoadgenResult]] = {t: [] for t in self.targets}
        for round_ in range(rounds):
            for target in self.targets:
                log(f"{scenario} round {round_ + 1}/{rounds}: {target}")
                per[target].append(self.run(target, group, *args, timeout=180))
        return per

    def warm_up(self, target: str, group: Group, *args: str, timeout: float) -> None:
        """One throw-away run before a memory measurement: the first streams pay for imports,
        pools and caches, not per connection. Skipped in quick runs."""
        if not self.quick:
            self.loadgen(target, group, *args).result(timeout)
