"""Load generators: thousands of concurrent SSE streams (raw asyncio streams) or direct gRPC streams.

One process, one uvloop event loop. The SSE client is a minimal HTTP/1.1 client written for this
job: a GET, the response head, chunked decoding, and an event-stream splitter that only looks
closely at frames that are not tokens (``--parser whatwg`` uses ``bridge.sse.Parser`` instead, to
check the fast path sees the same events). Per stream it records the first-token time, every
inter-token gap, the token count and how the stream ended; for the whole run it reports its own
CPU time, so a reader can see that the load generator was not the bottleneck.

Progress and the result are JSON lines on stdout::

    {"event": "start", ...}                    at once
    {"event": "ready", "streams": N}           --hold-s: every stream has its first frame
    {"event": "stalling", "at": UNIX_TIME}     --stall-after-tokens: the reader stopped reading
    {"event": "result", ...}                   the summary, last

Examples::

    python -m bench.loadgen sse --url http://127.0.0.1:8000/api/v2/bali-zero/chat-stream \\
        --query "hello world" --concurrency 100 --requests 1000
    python -m bench.loadgen sse --route openai --url http://127.0.0.1:8000/v1/chat/completions \\
        --query "hello world" --concurrency 100 --requests 1000
    python -m bench.loadgen grpc --target 127.0.0.1:50051 --query "hello world" --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
import uuid
from array import array
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import quote_plus, urlsplit

from bench.http1 import Http1Connection, HttpError
from bench.results import Summary

TOKEN_PREFIX = b'{"type":"token"'
SSE_HEADERS = {"Accept": "text/event-stream", "Cache-Control": "no-cache", "User-Agent": "bench-loadgen"}
OPENAI_TOKEN_MARK = b'"delta":{"content":'
OPENAI_MODEL = "bali-zero"


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@dataclass(slots=True)
class Stream:
    """What one stream did, times in seconds from ``perf_counter``."""

    started: float = 0.0
    first_token: float | None = None
    last_token: float = 0.0
    tokens: int = 0
    heartbeats: int = 0
    frames: int = 0
    done: bool = False
    error: str | None = None
    request_id: str = ""
    closed_at: float | None = None  # wall clock (time.time) when we closed it on purpose
    gaps: array = field(default_factory=lambda: array("d"))  # type: ignore[type-arg]

    def on_tokens(self, count: int, now: float) -> None:
        if self.first_token is None:
            self.first_token = now - self.started
            self.gaps.extend([0.0] * (count - 1))
        else:
            self.gaps.append(now - self.last_token)
            if count > 1:
                self.gaps.extend([0.0] * (count - 1))
        self.last_token = now
        self.tokens += count


# ------------------------------------------------------------------------------------ event streams


class FastEvents:
    """A minimal event-stream splitter for well-formed server output (LF or CRLF line ends).

    Token frames are recognised by the start of their JSON without parsing it; every other frame
    is parsed. ``feed`` returns (number of token frames, other frames as (event, data) pairs).
    """

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> tuple[int, list[tuple[str, bytes]]]:
        buf = self._buf + data if self._buf else data
        hold = b""
        if b"\r" in buf:
            if buf.endswith(b"\r"):  # may be the first half of a CRLF split across reads
                buf, hold = buf[:-1], b"\r"
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        frames = buf.split(b"\n\n")
        self._buf = frames.pop() + hold
        tokens = 0
        others: list[tuple[str, bytes]] = []
        for raw in frames:
            data_at = raw.find(b"data: ")
            if data_at >= 0 and raw.startswith(TOKEN_PREFIX, data_at + 6) and raw.find(b"event:") < 0:
                tokens += 1
                continue
            event, payload = "message", []
            for line in raw.split(b"\n"):
                if line.startswith(b"data:"):
                    payload.append(line[6:] if line.startswith(b"data: ") else line[5:])
                elif line.startswith(b"event:"):
                    event = line[6:].strip().decode()
            if payload:
                others.append((event, b"\n".join(payload)))
        return tokens, others


class WhatwgEvents:
    """The same interface over bridge.sse.Parser (slower; the reference interpretation)."""

    def __init__(self) -> None:
        from bridge.sse import Parser

        self._parser = Parser()

    def feed(self, data: bytes) -> tuple[int, list[tuple[str, bytes]]]:
        tokens = 0
        others: list[tuple[str, bytes]] = []
        for ev in self._parser.feed(data):
            if ev.type == "message" and ev.data.startswith('{"type":"token"'):
                tokens += 1
            else:
                others.append((ev.type, ev.data.encode()))
        return tokens, others


class OpenAIEvents:
    """The same interface over the OpenAI-compatible stream (``--route openai``), for the bridge's
    own output (LF line ends, one ``data:`` line per event).

    A token chunk is recognised by its ``"delta":{"content":`` without parsing it; every other
    event is parsed and told as the native frame it stands for, so one reader serves both routes:
    the first chunk (``bali_zero``) as ``metadata``, ``[DONE]`` as ``done``, an ``error`` object as
    an ``error`` frame, a ``: keep-alive`` comment as a heartbeat.
    """

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> tuple[int, list[tuple[str, bytes]]]:
        buf = self._buf + data if self._buf else data
        events = buf.split(b"\n\n")
        self._buf = events.pop()
        tokens = 0
        told: list[tuple[str, bytes]] = []
        for raw in events:
            if OPENAI_TOKEN_MARK in raw:
                tokens += 1
            elif raw.startswith(b":"):
                told.append(("heartbeat", b""))
            elif raw == b"data: [DONE]":
                told.append(("message", b'{"type":"done"}'))
            elif raw.startswith(b"data: "):
                frame = _native_frame(json.loads(raw[6:]))
                if frame is None:
                    tokens += 1
                else:
                    told.append(("message", frame))
        return tokens, told


def _native_frame(chunk: Any) -> bytes | None:
    """The native frame a parsed OpenAI event stands for; None for a token (the first chunk of a
    stream without metadata carries its first token beside ``role``)."""
    if not isinstance(chunk, dict):
        return b"{}"
    if isinstance(chunk.get("error"), dict):
        return json.dumps({"type": "error", "code": chunk["error"].get("code")}).encode()
    if isinstance(chunk.get("bali_zero"), dict):
        return json.dumps({"type": "metadata", "request_id": chunk["bali_zero"].get("request_id", "")}).encode()
    choices = chunk.get("choices") or [{}]
    if (choices[0].get("delta") or {}).get("content"):
        return None
    return b"{}"  # the finish chunk or the usage chunk: nothing to count


def openai_body(query: str) -> bytes:
    """The ``POST /v1/chat/completions`` body of one streamed question."""
    body = {"model": OPENAI_MODEL, "messages": [{"role": "user", "content": query}], "stream": True}
    return json.dumps(body).encode()


def native_body(query: str) -> bytes:
    """The ``POST /api/v2/bali-zero/chat-stream`` body of one question."""
    return json.dumps({"query": query}).encode()


# The routes asked with a JSON body, and how their body is made (the native GET has none).
POST_ROUTES: dict[str, Callable[[str], bytes]] = {"native-post": native_body, "openai": openai_body}


# --------------------------------------------------------------------------------------------- runs


@dataclass
class Options:
    kind: str
    query: str
    concurrency: int
    requests: int
    ramp_s: float = 0.0
    max_s: float = 60.0
    close_after_tokens: int | None = None
    stall_after_tokens: int | None = None
    stall_s: float = 0.0
    hold_s: float | None = None
    rcvbuf: int | None = None
    parser: str = "fast"
    keep_alive: bool = True
    url: str = ""
    target: str = ""
    channels: int = 1
    warmup: int = 0
    route: str = "native"


class Run:
    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.streams: list[Stream] = []
        self.issued = 0
        self.deadline = time.perf_counter() + opts.max_s
        self.first_frames = 0
        self.connect_errors = 0

    def next_stream(self) -> Stream | None:
        if self.issued >= self.opts.requests or time.perf_counter() >= self.deadline:
            return None
        self.issued += 1
        stream = Stream()
        self.streams.append(stream)
        return stream

    def got_first_frame(self) -> None:
        self.first_frames += 1

    async def stall(self, stream: Stream) -> None:
        emit("stalling", at=time.time(), tokens=stream.tokens)
        await asyncio.sleep(self.opts.stall_s)
        stream.closed_at = time.time()

    # ---- SSE
    async def sse_worker(self, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        parts = urlsplit(self.opts.url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        path = parts.path if self.opts.route in POST_ROUTES else f"{parts.path}?query={quote_plus(self.opts.query)}"
        conn = Http1Connection(host, port, rcvbuf=self.opts.rcvbuf)
        try:
            while (stream := self.next_stream()) is not None:
                reuse = await self.sse_one(conn, path, stream)
                if not reuse or not self.opts.keep_alive:
                    conn.close()
        finally:
            conn.close()

    async def sse_one(self, conn: Http1Connection, path: str, stream: Stream) -> bool:
        """One stream on ``conn``; True when the connection can carry the next request.

        ``--route native-post`` POSTs the question as JSON instead of a GET; ``--route openai``
        POSTs it to the OpenAI-compatible route, read the same way (``OpenAIEvents`` tells its
        chunks as frames).
        """
        opts = self.opts
        openai = opts.route == "openai"
        stream.started = time.perf_counter()
        try:
            if opts.route in POST_ROUTES:
                headers = {**SSE_HEADERS, "Content-Type": "application/json"}
                head = await conn.request("POST", path, headers, POST_ROUTES[opts.route](opts.query))
            else:
                head = await conn.request("GET", path, SSE_HEADERS)
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError, HttpError) as exc:
            stream.error = f"connect: {type(exc).__name__}: {exc}"
            self.connect_errors += 1
            return False
        if head.status != 200:
            stream.error = f"http {head.status}"
        events: FastEvents | WhatwgEvents | OpenAIEvents = (
            OpenAIEvents() if openai else FastEvents() if opts.parser == "fast" else WhatwgEvents()
        )
        first_frame = True
        perf = time.perf_counter
        try:
            while True:
                body = await conn.read()
                if body is None:
                    if conn.eof:
                        break
                    return head.keep_alive
                now = perf()
                if head.status != 200:
                    continue
                tokens, others = events.feed(body)
                if first_frame and (tokens or others):
                    first_frame = False
                    self.got_first_frame()
                if tokens:
                    stream.on_tokens(tokens, now)
                    stream.frames += tokens
                for event, payload in others:
                    stream.frames += 1
                    if event == "heartbeat":
                        stream.heartbeats += 1
                        continue
                    try:
                        message = json.loads(payload)
                    except ValueError:
                        continue
                    kind = message.get("type") if isinstance(message, dict) else None
                    if kind == "metadata":
                        stream.request_id = str(message.get("request_id", ""))
                    elif kind == "done":
                        stream.done = True
                    elif kind == "error":
                        stream.error = f"error frame: {message.get('code')}"
                    elif kind == "token":  # a token frame the fast path did not recognise
                        stream.on_tokens(1, now)
                if opts.close_after_tokens is not None and stream.tokens >= opts.close_after_tokens and not stream.done:
                    stream.closed_at = time.time()
                    return False
                if opts.stall_after_tokens is not None and stream.tokens >= opts.stall_after_tokens and not stream.done:
                    await self.stall(stream)
                    return False
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            stream.error = f"read: {type(exc).__name__}: {exc}"
            return False
        if stream.error is None and not stream.done:
            stream.error = "eof before done"
        return False

    # ---- gRPC
    async def grpc_worker(self, delay: float, stub: Any) -> None:
        from bali_zero.rag.v1 import rag_pb2

        if delay:
            await asyncio.sleep(delay)
        opts = self.opts
        perf = time.perf_counter
        while (stream := self.next_stream()) is not None:
            stream.started = perf()
            stream.request_id = uuid.uuid4().hex
            call = stub.StreamChat(rag_pb2.StreamChatRequest(query=opts.query, request_id=stream.request_id))
            first_frame = True
            try:
                async for message in call:
                    now = perf()
                    if first_frame:
                        first_frame = False
                        self.got_first_frame()
                    kind = message.WhichOneof("event")
                    if kind == "token":
                        stream.on_tokens(1, now)
                    elif kind == "completion":
                        stream.done = True
                    stream.frames += 1
                    if (
                        opts.close_after_tokens is not None
                        and stream.tokens >= opts.close_after_tokens
                        and not stream.done
                    ):
                        stream.closed_at = time.time()
                        call.cancel()
                        break
                    if (
                        opts.stall_after_tokens is not None
                        and stream.tokens >= opts.stall_after_tokens
                        and not stream.done
                    ):
                        await self.stall(stream)
                        call.cancel()
                        break
            except Exception as exc:  # grpc.aio.AioRpcError and friends
                stream.error = f"grpc: {type(exc).__name__}: {str(exc)[:200]}"
            finally:
                call.cancel()

    async def run(self) -> None:
        opts = self.opts
        n = opts.concurrency
        delays = [opts.ramp_s * i / n for i in range(n)] if opts.ramp_s > 0 else [0.0] * n
        channels: list[Any] = []
        if opts.kind == "grpc":
            import grpc

            from bali_zero.rag.v1 import rag_pb2_grpc

            channels = [grpc.aio.insecure_channel(opts.target) for _ in range(max(1, opts.channels))]
            stubs = [rag_pb2_grpc.RagServiceStub(c) for c in channels]  # type: ignore[no-untyped-call]
            tasks = [asyncio.ensure_future(self.grpc_worker(d, stubs[i % len(stubs)])) for i, d in enumerate(delays)]
        else:
            tasks = [asyncio.ensure_future(self.sse_worker(d)) for d in delays]
        try:
            if opts.hold_s is not None:
                while time.perf_counter() < self.deadline:  # bounded by --max-s
                    failed = sum(1 for st in self.streams if st.error is not None)
                    if self.first_frames + failed >= n or all(t.done() for t in tasks):
                        break
                    await asyncio.sleep(0.05)
                open_streams = sum(1 for s in self.streams if s.error is None and not s.done)
                emit("ready", streams=self.first_frames, open=open_streams, at=time.time())
                await asyncio.sleep(min(opts.hold_s, max(0.0, self.deadline - time.perf_counter())))
                for task in tasks:
                    task.cancel()
            done, pending = await asyncio.wait(tasks, timeout=max(0.1, self.deadline - time.perf_counter()))
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    exc = task.exception()
                    emit("worker_error", error=f"{type(exc).__name__}: {exc}")
        finally:
            for channel in channels:
                await channel.close()


def result_of(run: Run, wall: float, cpu: float, max_rss_kib: int) -> dict[str, Any]:
    streams = run.streams[run.opts.warmup :]
    first = [s.first_token * 1000 for s in streams if s.first_token is not None]
    gaps: list[float] = []
    for s in streams:
        gaps.extend(s.gaps)
    gaps_ms = [g * 1000 for g in gaps]
    tokens = sum(s.tokens for s in streams)
    errors: dict[str, int] = {}
    for s in streams:
        if s.error is not None:
            key = s.error.split(":", 2)[0] if not s.error.startswith("http") else s.error
            errors[key] = errors.get(key, 0) + 1
    out: dict[str, Any] = {
        "kind": run.opts.kind,
        "streams": len(streams),
        "completed": sum(1 for s in streams if s.done),
        "errors": errors,
        "error_examples": sorted({s.error for s in streams if s.error})[:3],
        "tokens": tokens,
        "heartbeats": sum(s.heartbeats for s in streams),
        "wall_s": wall,
        "tokens_per_s": tokens / wall if wall > 0 else None,
        "cpu_s": cpu,
        "cpu_utilisation": cpu / wall if wall > 0 else None,
        "max_rss_kib": max_rss_kib,
        "first_token_ms": asdict(Summary.of(first)),
        "gap_ms": asdict(Summary.of(gaps_ms)),
        "parser": run.opts.parser,
        "route": run.opts.route,
    }
    if len(first) <= 5000:
        out["first_token_ms_all"] = [round(x, 4) for x in first]
    if run.opts.close_after_tokens is not None or run.opts.stall_after_tokens is not None:
        out["closed"] = [[s.request_id, s.closed_at, s.tokens] for s in streams if s.closed_at is not None]
    return out


def parse_args(argv: Sequence[str] | None) -> Options:
    p = argparse.ArgumentParser(prog="bench.loadgen", description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=("sse", "grpc"))
    p.add_argument(
        "--url", default="", help="sse: http://HOST:PORT/api/v2/bali-zero/chat-stream (or /v1/chat/completions)"
    )
    p.add_argument(
        "--route",
        choices=("native", "native-post", "openai"),
        default="native",
        help="sse: GET the native stream, POST it a JSON body, or POST to the OpenAI-compatible route",
    )
    p.add_argument("--target", default="", help="grpc: HOST:PORT of the RAG service")
    p.add_argument("--query", required=True)
    p.add_argument("--concurrency", type=int, default=1, help="streams open at the same time")
    p.add_argument("--requests", type=int, default=None, help="total streams (default: --concurrency)")
    p.add_argument("--ramp-s", type=float, default=0.0, help="spread the first connects over this time")
    p.add_argument("--max-s", type=float, default=60.0, help="hard bound on the whole run")
    p.add_argument("--close-after-tokens", type=int, default=None, help="close each stream after N tokens")
    p.add_argument("--stall-after-tokens", type=int, default=None, help="stop reading after N tokens")
    p.add_argument("--stall-s", type=float, default=5.0, help="how long a stalled reader stalls")
    p.add_argument(
        "--hold-s",
        type=float,
        default=None,
        help="idle test: once every stream has its first frame, hold them open this long",
    )
    p.add_argument("--rcvbuf", type=int, default=None, help="SO_RCVBUF of each client socket")
    p.add_argument("--parser", choices=("fast", "whatwg"), default="fast")
    p.add_argument("--no-keep-alive", action="store_true", help="a new connection per stream")
    p.add_argument("--channels", type=int, default=1, help="grpc: channels to spread streams over")
    p.add_argument("--cpus", default="", help="pin this process to these CPUs (comma-separated)")
    p.add_argument("--warmup", type=int, default=0, help="leave the first N streams out of the result")
    a = p.parse_args(argv)
    if a.cpus:
        os.sched_setaffinity(0, {int(c) for c in a.cpus.split(",") if c.strip()})
    if (a.kind == "sse" and not a.url) or (a.kind == "grpc" and not a.target):
        p.error("sse needs --url, grpc needs --target")
    return Options(
        kind=a.kind,
        url=a.url,
        target=a.target,
        query=a.query,
        concurrency=max(1, a.concurrency),
        requests=(a.requests if a.requests is not None else max(1, a.concurrency)) + a.warmup,
        ramp_s=a.ramp_s,
        max_s=min(a.max_s, 3600.0),
        close_after_tokens=a.close_after_tokens,
        stall_after_tokens=a.stall_after_tokens,
        stall_s=a.stall_s,
        hold_s=a.hold_s,
        rcvbuf=a.rcvbuf,
        parser=a.parser,
        keep_alive=not a.no_keep_alive,
        channels=a.channels,
        warmup=a.warmup,
        route=a.route,
    )


def main(argv: Sequence[str] | None = None, loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None) -> int:
    opts = parse_args(argv)
    fd_limit = raise_fd_limit()
    if loop_factory is None:
        import uvloop

        loop_factory = uvloop.new_event_loop
    emit("start", kind=opts.kind, concurrency=opts.concurrency, requests=opts.requests, fd_limit=fd_limit)
    run_ = None
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        run_ = Run(opts)
        runner.run(run_.run())
    wall = time.perf_counter() - started
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    emit("result", **result_of(run_, wall, cpu, usage1.ru_maxrss))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
