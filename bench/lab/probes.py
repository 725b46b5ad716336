"""Probes around one server's request path, for the first-token timeline (``bench/lab/timeline.py``).

    python -m bench.lab.probes OUT.json bridge --port 0    # or: peer

Installs the probes, then runs the server's own entry point unchanged: production code carries no
timing hooks (one ``perf_counter`` per phase per request would be paid by every request to serve
a benchmark). A probe wraps a function found by name (module and qualified name); each phase
names several candidates, so the timeline survives code moving between modules, and a phase
whose functions no longer exist is reported as unresolved instead of silently reading zero.

A mark stores four clocks when the request first reaches it: wall (``perf_counter_ns``), CPU of
the event-loop thread (``thread_time_ns``), CPU of the whole process (``process_time_ns``: gRPC's
poller thread too) and the count of task steps so far. A task step is one resumption of a task
by the event loop (counted by wrapping the coroutine of every task the loop creates), so the
step count between two marks is the number of event-loop hops between them.

One request at a time (the scenario runs one client): the record starts when the request's bytes
reach the HTTP protocol and ends when the first ``token`` frame was handed to the socket. The
records are written to OUT.json when the server shuts down.
"""

from __future__ import annotations

import asyncio
import collections.abc
import contextvars
import functools
import importlib
import inspect
import json
import sys
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Literal

# A mark: wall ns, loop-thread CPU ns, process CPU ns, task steps so far.
Clocks = tuple[int, int, int, int]

RECEIVED = "received"
FIRST_TOKEN_WRITTEN = "first_token_written"


@dataclass(frozen=True, slots=True)
class Probe:
    """Set ``mark`` on entry to (or return from) the first of ``targets`` that resolves.

    ``when`` sees the call's arguments and decides whether this call counts (for ``send``: only
    the message that carries the first token).
    """

    mark: str
    targets: tuple[str, ...]
    at: Literal["entry", "exit"]
    when: Callable[..., bool] | None = None
    bridge_only: bool = False  # not installed in the peer (its import would load the bridge there)
    peer_only: bool = False


def _is_start(_self: object, message: dict[str, Any]) -> bool:
    return message.get("type") == "http.response.start"


def _carries_token(_self: object, message: dict[str, Any]) -> bool:
    return message.get("type") == "http.response.body" and b'"type":"token"' in message.get("body", b"")


_CYCLE = "uvicorn.protocols.http.httptools_impl:RequestResponseCycle"
_DATA_RECEIVED = "uvicorn.protocols.http.httptools_impl:HttpToolsProtocol.data_received"
_GRPC_READ = ("grpc.aio._call:_StreamResponseMixin.read", "grpc.aio._interceptor:_InterceptedStreamResponseMixin.read")
_GRPC_METADATA = ("grpc.aio._call:Call.initial_metadata", "grpc.aio._interceptor:InterceptedCall.initial_metadata")

# In path order. The bridge-only probes find nothing in the reference peer (reported, not fatal).
PROBES: tuple[Probe, ...] = (
    # The bridge's own HTTP/1.1 protocol (request head limits) replaces uvicorn's data_received.
    Probe(
        RECEIVED,
        ("bridge.server.protocol:HeadLimitedProtocol.data_received", _DATA_RECEIVED),
        "entry",
        bridge_only=True,
    ),
    Probe(RECEIVED, (_DATA_RECEIVED,), "entry", peer_only=True),
    Probe("app_called", (f"{_CYCLE}.run_asgi",), "entry"),
    Probe("endpoint_called", ("bridge.endpoints:Endpoints.chat_stream",), "entry", bridge_only=True),
    Probe("identity_start", ("bridge.gate:Gate.identify",), "entry", bridge_only=True),
    Probe("identity_done", ("bridge.gate:Gate.identify",), "exit", bridge_only=True),
    Probe("rate_limit_start", ("bridge.ratelimit:RateLimiter.hit",), "entry", bridge_only=True),
    Probe("rate_limit_done", ("bridge.ratelimit:RateLimiter.hit",), "exit", bridge_only=True),
    Probe("input_start", ("bridge.endpoints:read_input", "bridge.inputs:read_input"), "entry", bridge_only=True),
    Probe("input_done", ("bridge.endpoints:read_input", "bridge.inputs:read_input"), "exit", bridge_only=True),
    Probe("stream_cap_start", ("bridge.streamcap:StreamCaps.acquire",), "entry", bridge_only=True),
    Probe("stream_cap_done", ("bridge.streamcap:StreamCaps.acquire",), "exit", bridge_only=True),
    Probe("span_start", ("bridge.telemetry:Telemetry.start_stream_span",), "entry", bridge_only=True),
    Probe("span_done", ("bridge.telemetry:Telemetry.start_stream_span",), "exit", bridge_only=True),
    Probe("grpc_call_start", ("grpc.aio._channel:UnaryStreamMultiCallable.__call__",), "entry"),
    Probe("grpc_call_started", ("grpc.aio._channel:UnaryStreamMultiCallable.__call__",), "exit"),
    Probe("metadata_wait", _GRPC_METADATA, "entry"),
    Probe("metadata_received", _GRPC_METADATA, "exit"),
    Probe("headers_written", (f"{_CYCLE}.send",), "exit", _is_start),
    Probe("first_read", _GRPC_READ, "entry"),
    Probe("first_message", _GRPC_READ, "exit"),
    Probe("first_frame_built", ("bridge.sse:token_frame",), "exit", bridge_only=True),
    Probe(FIRST_TOKEN_WRITTEN, (f"{_CYCLE}.send",), "exit", _carries_token),
)


class Recorder:
    """The marks of the request in flight and of the finished ones; the task step counter."""

    def __init__(self) -> None:
        self.steps = 0
        self.current: dict[str, Clocks] | None = None
        self.records: list[dict[str, Clocks]] = []
        self.abandoned = 0  # requests that never wrote a token (errors, or a new request came first)
        self.steps_by_coroutine: collections.Counter[str] = collections.Counter()
        self._counting_by_coroutine = False

    def clocks(self) -> Clocks:
        return time.perf_counter_ns(), time.thread_time_ns(), time.process_time_ns(), self.steps

    def mark(self, name: str) -> None:
        if name == RECEIVED:
            if self.current is not None:
                self.abandoned += 1
            self.current = {}
            self._counting_by_coroutine = True
        current = self.current
        if current is None or name in current:
            return
        current[name] = self.clocks()
        if name == FIRST_TOKEN_WRITTEN:
            self.records.append(current)
            self.current = None
            self._counting_by_coroutine = False

    def step(self, coroutine_name: str) -> None:
        self.steps += 1
        if self._counting_by_coroutine:
            self.steps_by_coroutine[coroutine_name] += 1


RECORDER = Recorder()


class _CountingCoroutine(collections.abc.Coroutine[Any, Any, Any]):
    """A task's coroutine that counts every resumption (``send``/``throw``) as a task step."""

    __slots__ = ("_inner", "_name")

    def __init__(self, inner: collections.abc.Coroutine[Any, Any, Any]) -> None:
        self._inner = inner
        self._name = getattr(inner, "__qualname__", type(inner).__name__)

    def send(self, value: Any) -> Any:
        RECORDER.step(self._name)
        return self._inner.send(value)

    def throw(self, *args: Any) -> Any:
        RECORDER.step(self._name)
        return self._inner.throw(*args)

    def close(self) -> None:
        self._inner.close()

    def __await__(self) -> Generator[Any, None, Any]:
        return self._inner.__await__()

    def __getattr__(self, name: str) -> Any:  # cr_frame, cr_running... (anyio inspects them)
        return getattr(self._inner, name)


def _counting_task_factory(
    loop: asyncio.AbstractEventLoop, coro: Any, context: contextvars.Context | None = None
) -> asyncio.Task[Any]:
    if isinstance(coro, collections.abc.Coroutine):
        coro = _CountingCoroutine(coro)
    return asyncio.Task(coro, loop=loop, context=context)


def _resolve(target: str) -> tuple[Any, str] | None:
    """The object holding the attribute named by ``module:Qual.name``, and the attribute's name."""
    module_name, _, qualname = target.partition(":")
    try:
        owner: Any = importlib.import_module(module_name)
    except ImportError:
        return None
    *path, attr = qualname.split(".")
    for part in path:
        owner = getattr(owner, part, None)
        if owner is None:
            return None
    return (owner, attr) if attr in vars(owner) else None


def _wrap(original: Callable[..., Any], probe: Probe) -> Callable[..., Any]:
    mark, when, entry = probe.mark, probe.when, probe.at == "entry"
    if inspect.iscoroutinefunction(original):

        @functools.wraps(original)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            counts = when is None or when(*args, **kwargs)
            if counts and entry:
                RECORDER.mark(mark)
            result = await original(*args, **kwargs)
            if counts and not entry:
                RECORDER.mark(mark)
            return result

        return async_wrapper

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        counts = when is None or when(*args, **kwargs)
        if counts and entry:
            RECORDER.mark(mark)
        result = original(*args, **kwargs)
        if counts and not entry:
            RECORDER.mark(mark)
        return result

    return wrapper


def install(probes: tuple[Probe, ...] = PROBES, *, bridge: bool = True) -> dict[str, str | None]:
    """Wrap every probe's first resolvable target; mark -> the target used (None: none resolved)."""
    used: dict[str, str | None] = {}
    for probe in probes:
        if (probe.bridge_only and not bridge) or (probe.peer_only and bridge):
            continue
        used[probe.mark] = None
        for target in probe.targets:
            found = _resolve(target)
            if found is None:
                continue
            owner, attr = found
            setattr(owner, attr, _wrap(vars(owner)[attr], probe))
            used[probe.mark] = target
            break
    return used


def _hook_server(out: str, used: dict[str, str | None]) -> None:
    """Count task steps once the server's loop runs; write the records when it shuts down.

    Written from ``shutdown``, not at exit: uvicorn re-raises a captured SIGTERM after shutting
    down, and a process killed by its signal runs no exit handlers.
    """
    import uvicorn

    startup, shutdown = uvicorn.Server.startup, uvicorn.Server.shutdown

    @functools.wraps(startup)
    async def startup_with_counter(self: uvicorn.Server, *args: Any, **kwargs: Any) -> None:
        asyncio.get_running_loop().set_task_factory(_counting_task_factory)
        await startup(self, *args, **kwargs)

    @functools.wraps(shutdown)
    async def shutdown_and_write(self: uvicorn.Server, *args: Any, **kwargs: Any) -> None:
        await shutdown(self, *args, **kwargs)
        _write(out, used)

    uvicorn.Server.startup = startup_with_counter  # type: ignore[method-assign]
    uvicorn.Server.shutdown = shutdown_and_write  # type: ignore[method-assign]


def _write(out: str, used: dict[str, str | None]) -> None:
    with open(out, "w", encoding="utf-8") as fh:
        json.dump(
            {
                "probes": used,
                "records": RECORDER.records,
                "abandoned": RECORDER.abandoned,
                "steps_by_coroutine": dict(RECORDER.steps_by_coroutine.most_common()),
            },
            fh,
        )


def main(argv: list[str]) -> int:
    out, server, *rest = argv
    used = install(bridge=server == "bridge")
    _hook_server(out, used)
    if server == "bridge":
        from bridge.cli import main as bridge_main

        return bridge_main(rest)
    if server == "peer":
        from bench.peers import reference_bridge

        sys.argv = ["reference_bridge", *rest]
        reference_bridge.main()
        return 0
    print(f"bench.lab.probes: unknown server {server!r} (bridge or peer)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
