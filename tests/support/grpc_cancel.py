"""Native memory per cancelled gRPC stream, for one way of cancelling: run as a subprocess.

``python -m tests.support.grpc_cancel --target HOST:PORT --pattern P --cancels N`` opens
StreamChat calls on one grpc.aio channel to an echo stub, lets each deliver a few messages,
cancels it the way ``P`` says, and prints one JSON line: VmRSS (KiB) sampled every ``--every``
cancels after ``--warmup`` cancels, and the least-squares slope in bytes per cancel.

Patterns:
- ``task``: cancel the call *and* the task awaiting ``call.read()`` (grpc/grpc#43360: the
  cancelled awaiter of ``execute_batch`` drops its op array on every cancel, forever);
- ``call``: ``call.cancel()`` only; the pending read finishes with CANCELLED by itself;
- ``session``: the bridge's own path, ``StreamSession.abort()`` on a session pumping the call
  (what a disconnect, a DELETE or the end of the resume window does);
- ``traced``: the same with tracing on, as the bridge traces its streams (``StreamTracing``);
- ``intercepted``: the same through a tracing *interceptor* (calls are InterceptedCalls, read
  through grpc.aio's async-generator wrapper: leaks when cancelled mid-read).

A separate process per pattern, so one pattern's heap cannot hide or feed another's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
import uvloop
from opentelemetry.sdk.trace import TracerProvider

from bali_zero.rag.v1 import rag_pb2, rag_pb2_grpc
from bridge.stream.session import NoHooks, StreamSession
from bridge.stream.source import StreamPolicy
from bridge.telemetry import StreamTracing, client_interceptors_for
from bridge.upstream import Upstream
from bzb_shared.fit import least_squares_slope

MESSAGES_BEFORE_CANCEL = 3  # metadata and two tokens: the call is mid-stream, a read is pending
QUERY = " ".join(f"w{i}" for i in range(200))  # far more tokens than are ever read
# The session never waits for a reader (window and buffers far above what a few messages fill).
POLICY = StreamPolicy(
    heartbeat_interval_s=15.0,
    send_timeout_s=30.0,
    resume_grace_s=0.0,
    window_frames=10_000,
    buffer_frames=10_000,
    buffer_bytes=1 << 24,
)


def vm_rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def request() -> rag_pb2.StreamChatRequest:
    return rag_pb2.StreamChatRequest(query=QUERY)


async def cancel_task_and_call(stub: Any) -> None:
    call = stub.StreamChat(request(), timeout=30)
    for _ in range(MESSAGES_BEFORE_CANCEL):
        await call.read()
    reader = asyncio.ensure_future(call.read())
    await asyncio.sleep(0)  # the read is now pending inside grpc
    call.cancel()
    reader.cancel()
    with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
        await reader


async def cancel_call_only(stub: Any) -> None:
    call = stub.StreamChat(request(), timeout=30)
    for _ in range(MESSAGES_BEFORE_CANCEL):
        await call.read()
    reader = asyncio.ensure_future(call.read())
    await asyncio.sleep(0)
    call.cancel()
    with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
        await reader


def session_abort(upstream: Upstream) -> Callable[[Any], Awaitable[None]]:
    async def one(_stub: Any) -> None:
        session = StreamSession(stream_id="s", request_id="r", owner="o", policy=POLICY)
        session.start(upstream.chat_stream(request()))
        session.announce(NoHooks())  # as the opener does once the response accepted the stream
        while session.last_seq < MESSAGES_BEFORE_CANCEL - 1:  # metadata + tokens appended
            await session.changed()
        session.abort()
        await session.wait_closed()

    return one


async def run(target: str, pattern: str, cancels: int, warmup: int, every: int, parallel: int) -> dict[str, Any]:
    tracer = TracerProvider().get_tracer("grpc_cancel")  # recording spans, exported nowhere
    interceptors = client_interceptors_for(tracer) if pattern == "intercepted" else []
    upstream = Upstream(
        target, interceptors, timeout_s=30, stream_tracing=StreamTracing(tracer) if pattern == "traced" else None
    )
    channel = grpc.aio.insecure_channel(target)
    stub = rag_pb2_grpc.RagServiceStub(channel)
    one: Callable[[Any], Awaitable[None]] = {
        "task": cancel_task_and_call,
        "call": cancel_call_only,
    }.get(pattern) or session_abort(upstream)
    samples: list[tuple[int, int]] = []
    done = 0

    async def worker(share: int) -> None:
        nonlocal done
        for _ in range(share):
            await one(stub)
            done += 1
            if done > warmup and done % every == 0:
                samples.append((done, vm_rss_kib()))

    shares = [cancels // parallel + (i < cancels % parallel) for i in range(parallel)]
    await asyncio.gather(*(worker(s) for s in shares))
    await channel.close(None)
    await upstream.close()
    xs = [float(n) for n, _ in samples]
    ys = [float(kib) for _, kib in samples]
    return {
        "pattern": pattern,
        "cancels": cancels,
        "warmup": warmup,
        "samples": samples,
        "bytes_per_cancel": round(least_squares_slope(xs, ys) * 1024, 2) if len(samples) >= 2 else None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tests.support.grpc_cancel", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True)
    p.add_argument("--pattern", choices=("task", "call", "session", "traced", "intercepted"), required=True)
    p.add_argument("--cancels", type=int, default=6000)
    p.add_argument("--warmup", type=int, default=1500)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--parallel", type=int, default=20)
    a = p.parse_args(argv)
    result = uvloop.run(run(a.target, a.pattern, a.cancels, a.warmup, a.every, a.parallel))
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
