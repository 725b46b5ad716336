"""The SSE bridge end to end: uvicorn on a real socket in front of the real stub."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from starlette.types import Message

from bali_zero.rag.v1 import rag_pb2
from bridge.errors import BadRequest, BridgeError
from bridge.stream import response as response_module
from bridge.stream.response import EventStreamResponse
from bridge.stream.session import NoHooks, StreamSession
from bridge.types import NullObserver, Outcome, StreamResult
from bridge.upstream import Upstream
from tests.conftest import BridgeFactory, StubFactory
from tests.payloads import BIG_TOKEN, DELIM, EDGE_TOKENS, MANY_TOKENS, as_query
from tests.support.processes import Bridge, Stub
from tests.support.sessions import NO_RESUME
from tests.support.sse_client import STREAM_PATH, StreamReply, open_stream


def assert_well_formed(reply: StreamReply) -> None:
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert reply.headers["cache-control"].startswith("no-cache")
    assert reply.headers["x-accel-buffering"] == "no"
    assert "content-length" not in reply.headers
    ids = [e.last_event_id for e in reply.events]
    assert all(ids), "every frame has an id"
    frames = reply.frames
    assert [f["type"] for f in frames].count("done") + [f["type"] for f in frames].count("error") == 1
    assert frames[-1]["type"] in {"done", "error"}
    indices = [f["index"] for f in frames if f["type"] == "token"]
    assert indices == list(range(len(indices)))


@pytest.fixture(scope="module")
def delim_stub() -> Iterator[Stub]:
    stub = Stub("--mode", "echo", "--echo-delimiter", DELIM, "--max-query-bytes", "70000")
    yield stub
    stub.stop()


@pytest.fixture(scope="module")
def delim_bridge(delim_stub: Stub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bridge]:
    bridge = Bridge(
        {
            "RAG_TARGET": delim_stub.target,
            "ENABLE_SSE_STREAMING": "true",
            "RATE_LIMIT": "10000/minute",
            "MAX_QUERY_BYTES": "70000",
            "MAX_BODY_BYTES": "300000",
            "MAX_STREAMS_PER_USER": "50",
            "AUDIT_DB": str(tmp_path_factory.mktemp("audit") / "a.sqlite3"),
            "LOG_LEVEL": "WARNING",
        }
    )
    yield bridge
    bridge.stop()


@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("name", sorted(EDGE_TOKENS))
async def test_edge_payloads_round_trip_exactly(delim_bridge: Bridge, name: str, method: str) -> None:
    tokens = EDGE_TOKENS[name]
    query = as_query(tokens)
    kwargs = {"params": {"query": query}} if method == "GET" else {"json_body": {"query": query}}
    reply = await open_stream(delim_bridge.url, method=method, **kwargs)  # type: ignore[arg-type]
    assert_well_formed(reply)
    assert reply.tokens() == tokens
    assert reply.frames[-1]["type"] == "done"
    assert reply.frames[-1]["metrics"]["tokens"] == len(tokens)


async def test_64k_token_and_10000_tokens(delim_bridge: Bridge) -> None:
    big = await open_stream(delim_bridge.url, method="POST", json_body={"query": as_query(BIG_TOKEN)})
    assert_well_formed(big)
    assert big.tokens() == BIG_TOKEN
    many = await open_stream(delim_bridge.url, method="POST", json_body={"query": as_query(MANY_TOKENS)})
    assert_well_formed(many)
    assert many.tokens() == MANY_TOKENS


async def test_rag_stream_has_metadata_tokens_done(stub_factory: StubFactory, bridge_factory: BridgeFactory) -> None:
    bridge = bridge_factory(stub_factory())
    reply = await open_stream(bridge.url, params={"query": "What do I need for a B211A visa?"})
    assert_well_formed(reply)
    first, last = reply.frames[0], reply.frames[-1]
    assert first["type"] == "metadata" and first["sources"] and first["stream_id"]
    assert reply.headers["x-connection-id"] == first["stream_id"]
    assert last == {
        "type": "done",
        "finish_reason": "stop",
        "metrics": {
            "first_token_ms": last["metrics"]["first_token_ms"],
            "tokens": len(reply.tokens()),
            "duration_ms": last["metrics"]["duration_ms"],
        },
    }
    assert 0 < last["metrics"]["first_token_ms"] <= last["metrics"]["duration_ms"]


async def _close_after_headers(url: str, query: str) -> tuple[float, str]:
    """Open a stream with a raw socket, wait for the first frame, then close; return (close time, request id)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET {STREAM_PATH}?query={query} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    data = b""
    while b'"request_id":"' not in data:
        data += await reader.read(65536)
    request_id = data.split(b'"request_id":"', 1)[1].split(b'"', 1)[0].decode()
    writer.transport.abort()
    await asyncio.sleep(0)  # abort() closes the socket on the next loop iteration
    return time.time(), request_id


@pytest.mark.parametrize("phase", ["before_first_token", "mid_stream"])
async def test_disconnect_cancels_upstream_within_100ms(
    stub_factory: StubFactory, bridge_factory: BridgeFactory, phase: str
) -> None:
    args = ["--first-token-delay-ms", "5000"] if phase == "before_first_token" else ["--token-delay-ms", "10"]
    stub = stub_factory("--mode", "echo", "--repeat", "500", *args)
    bridge = bridge_factory(stub)
    if phase == "mid_stream":
        reply = await open_stream(bridge.url, params={"query": "tick tock"}, stop_after_tokens=5)
        closed_at = time.time()
        request_id = reply.frames[0]["request_id"]
    else:
        closed_at, request_id = await _close_after_headers(bridge.url, "hello")
    end = await stub.ended(request_id)
    assert end["outcome"] == "cancelled"
    assert end["ended_at"] - closed_at < 0.100


async def test_stalled_reader_bounds_memory_and_pauses_upstream(
    stub_factory: StubFactory, bridge_factory: BridgeFactory
) -> None:
    stub = stub_factory("--mode", "echo", "--repeat", "50000")
    bridge = bridge_factory(stub, SEND_TIMEOUT_S="4")
    proc = psutil.Process(bridge.proc.pid)
    await open_stream(bridge.url, params={"query": "warm up"})  # first-use allocations out of the way
    before = proc.memory_info().rss
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small TCP window
    sock.connect(("127.0.0.1", bridge.port))
    # 1 KB tokens: the kernel's socket buffers (several MB on loopback) fill after a few thousand
    # tokens, so the stall starts at once instead of after ~50 000 tiny ones.
    query = "x" * 1000 + "%20" + "y" * 1000
    sock.sendall(f"GET {STREAM_PATH}?query={query} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = sock.recv(4096)  # read the headers and a little, then stop reading
    assert b"200 OK" in head
    # The bridge gives up after SEND_TIMEOUT_S of a blocked send and cancels upstream.
    end = await stub.ended(timeout=60)
    growth = proc.memory_info().rss - before
    sock.close()
    assert end["outcome"] == "cancelled"
    assert end["tokens_sent"] < 100_000 / 2, "the stub was paused, not drained into the bridge"
    assert growth < 8 * 1024 * 1024, f"bridge RSS grew by {growth / 1e6:.1f} MB"


async def test_heartbeat_during_slow_first_token(stub_factory: StubFactory, bridge_factory: BridgeFactory) -> None:
    stub = stub_factory("--mode", "echo", "--first-token-delay-ms", "2000")
    bridge = bridge_factory(stub, HEARTBEAT_INTERVAL_S="0.4")
    reply = await open_stream(bridge.url, params={"query": "wait for it"})
    assert_well_formed(reply)
    kinds = [e.type for e in reply.events]
    first_token = next(i for i, e in enumerate(reply.events) if e.type == "message" and '"token"' in e.data)
    assert kinds[:first_token].count("heartbeat") >= 3
    assert all(json.loads(h.data) == {"type": "heartbeat"} for h in reply.heartbeats)


async def test_failure_mid_stream_gives_exactly_one_error_frame(
    stub_factory: StubFactory, bridge_factory: BridgeFactory
) -> None:
    bridge = bridge_factory(stub_factory("--mode", "echo", "--fail-after", "3"))
    reply = await open_stream(bridge.url, params={"query": "a b c d e f"})
    assert_well_formed(reply)
    assert reply.tokens() == ["a ", "b ", "c "]
    errors = [f for f in reply.frames if f["type"] == "error"]
    assert errors == [
        {"type": "error", "code": "UPSTREAM_UNAVAILABLE", "message": errors[0]["message"], "retryable": True}
    ]


async def test_flag_off_gives_404_but_chat_works(stub_factory: StubFactory, bridge_factory: BridgeFactory) -> None:
    bridge = bridge_factory(stub_factory("--mode", "echo"), ENABLE_SSE_STREAMING="false")
    async with httpx.AsyncClient(base_url=bridge.url) as client:
        for method in ("GET", "POST"):
            r = await client.request(method, STREAM_PATH, params={"query": "hi"}, json={"query": "hi"})
            assert r.status_code == 404
            assert r.json()["error"]["code"] == "STREAMING_DISABLED"
            assert "ENABLE_SSE_STREAMING" in r.json()["error"]["message"]
        r = await client.post("/api/v2/bali-zero/chat", json={"query": "hello there"})
        assert r.status_code == 200
        assert r.json()["answer"] == "hello there"


async def test_upstream_down_before_stream_is_503_with_retry_after(
    bridge_factory: BridgeFactory, tmp_path: Path
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    audit_db = str(tmp_path / "refused.sqlite3")
    bridge = bridge_factory(RAG_TARGET=f"127.0.0.1:{dead}", AUDIT_DB=audit_db)
    async with httpx.AsyncClient(base_url=bridge.url) as client:
        r = await client.get(STREAM_PATH, params={"query": "hi"})
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "UPSTREAM_UNAVAILABLE"
        assert int(r.headers["retry-after"]) >= 1
        r = await client.post("/api/v2/bali-zero/chat", json={"query": "hi"})
        assert r.status_code == 503
        assert (await client.get("/readyz")).status_code == 503
        assert (await client.get("/healthz")).status_code == 200
    bridge.stop()  # flushes the audit queue
    export = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "bridge", "audit", "export"],
        capture_output=True,
        text=True,
        env={**os.environ, "AUDIT_DB": audit_db},
        check=True,
    )
    records = [json.loads(line) for line in export.stdout.splitlines()]
    refused = [r for r in records if r["event_type"] == "stream_failed"]
    assert [r["error_code"] for r in refused] == ["UPSTREAM_UNAVAILABLE"], "a refused stream is audited too"


BAD_INPUTS = [
    ("GET", {}, None, {}, 400, "QUERY_REQUIRED"),
    ("GET", {"query": "   "}, None, {}, 400, "QUERY_REQUIRED"),
    ("POST", {}, b'{"query":"' + b"x" * 70_001 + b'"}', {"content-type": "application/json"}, 400, "QUERY_TOO_LONG"),
    ("GET", {"query": "hi", "conversation_history": "{not json"}, None, {}, 400, "INVALID_JSON"),
    ("GET", {"query": "hi", "conversation_history": '{"role":"user"}'}, None, {}, 400, "INVALID_HISTORY"),
    (
        "GET",
        {"query": "hi", "conversation_history": '[{"role":"god","content":"x"}]'},
        None,
        {},
        400,
        "INVALID_HISTORY",
    ),
    (
        "GET",
        {"query": "hi", "conversation_history": '[{"role":"user","content":""}]'},
        None,
        {},
        400,
        "INVALID_HISTORY",
    ),
    ("GET", {"query": "hi", "conversation_history": "[" * 5000 + "]" * 5000}, None, {}, 400, None),
    ("POST", {}, b"query=hi", {"content-type": "application/x-www-form-urlencoded"}, 415, "UNSUPPORTED_MEDIA_TYPE"),
    ("POST", {}, b"{bad json", {"content-type": "application/json"}, 400, "INVALID_JSON"),
    ("POST", {}, b"[1,2]", {"content-type": "application/json"}, 400, "INVALID_JSON"),
    ("POST", {}, b'{"query": 5}', {"content-type": "application/json"}, 400, "QUERY_REQUIRED"),
    ("POST", {}, b'{"query": "\\ud800"}', {"content-type": "application/json"}, 400, "INVALID_REQUEST"),
    (
        "POST",
        {},
        b'{"query":"' + b"x" * 300_000 + b'"}',
        {"content-type": "application/json"},
        413,
        "PAYLOAD_TOO_LARGE",
    ),
    (
        "POST",
        {},
        b'{"query":"hi","user_email":"not an email"}',
        {"content-type": "application/json"},
        400,
        "INVALID_REQUEST",
    ),
    ("PUT", {}, b"{}", {"content-type": "application/json"}, 405, "METHOD_NOT_ALLOWED"),
]


@pytest.mark.parametrize(("method", "params", "body", "headers", "status", "code"), BAD_INPUTS)
async def test_bad_input_gets_typed_4xx(
    delim_bridge: Bridge,
    method: str,
    params: dict[str, str],
    body: bytes | None,
    headers: dict[str, str],
    status: int,
    code: str | None,
) -> None:
    async with httpx.AsyncClient(base_url=delim_bridge.url) as client:
        for path in (STREAM_PATH, "/api/v2/bali-zero/chat"):
            if path.endswith("/chat") and method == "GET":
                continue
            r = await client.request(method, path, params=params, content=body, headers=headers)
            assert r.status_code == status, (path, r.text)
            error = r.json()["error"]
            assert error["message"] and "Traceback" not in r.text
            if code:
                assert error["code"] == code


async def test_unknown_route_is_json_404(delim_bridge: Bridge) -> None:
    async with httpx.AsyncClient(base_url=delim_bridge.url) as client:
        r = await client.get("/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "NOT_FOUND"


async def test_sigterm_drains_then_ends_streams_with_shutting_down(
    stub_factory: StubFactory, bridge_factory: BridgeFactory
) -> None:
    stub = stub_factory("--mode", "echo", "--token-delay-ms", "20", "--repeat", "1000")
    bridge = bridge_factory(stub, SHUTDOWN_GRACE_S="1")
    started = asyncio.Event()

    async def long_stream() -> StreamReply:
        task_reply = asyncio.create_task(open_stream(bridge.url, params={"query": "long answer"}))
        started.set()
        return await task_reply

    task = asyncio.create_task(long_stream())
    await started.wait()
    await asyncio.sleep(0.3)  # let the stream get going (tokens flow every 20 ms)
    signalled = time.monotonic()
    bridge.signal(signal.SIGTERM)
    reply = await task
    elapsed = time.monotonic() - signalled
    assert_well_formed(reply)
    assert reply.frames[-1] == {
        "type": "error",
        "code": "SHUTTING_DOWN",
        "retryable": True,
        "message": reply.frames[-1]["message"],
    }
    assert 0.9 < elapsed < 5
    assert len(reply.tokens()) > 40, "streams kept running during the grace period"
    assert (await stub.ended(reply.frames[0]["request_id"]))["outcome"] == "cancelled"
    assert bridge.wait(10) == 0


async def test_abort_cancels_the_upstream_call_at_once(stub_factory: StubFactory) -> None:
    """``abort`` cancels the gRPC call itself, not only the pump task.

    Under load the pump runs again only several event-loop turns later; until then the RAG server
    would keep generating for a client that left (cancellation p99 was ~80 ms at 500 streams).
    """
    stub = stub_factory("--mode", "echo", "--token-delay-ms", "1000", "--repeat", "10")
    upstream = Upstream(stub.target, timeout_s=30)
    try:
        request = rag_pb2.StreamChatRequest(query="a b c", request_id="abort-at-once")
        call = upstream.chat_stream(request)
        session = StreamSession(stream_id="s1", request_id="abort-at-once", owner="o", policy=NO_RESUME)
        session.start(call)
        session.announce(NoHooks())
        while session.last_seq < 2:  # the metadata frame and the first token: the call is streaming
            await session.changed()
        session.abort()
        assert call.cancelled()  # before any await: the pump task has not run since abort()
        await session.wait_closed()
        assert session.result is not None and session.result.outcome == "cancelled"
        assert (await stub.ended("abort-at-once"))["outcome"] == "cancelled"
    finally:
        await upstream.close()


async def test_abort_before_the_pump_first_runs_still_ends_the_session(stub_factory: StubFactory) -> None:
    """Cancelling a task before its first step skips its body, ``finally`` included: the session
    would never end (no on_end, so the stream slot leaks). ``abort`` defers to the pump instead."""
    stub = stub_factory("--mode", "echo", "--token-delay-ms", "1000")
    upstream = Upstream(stub.target, timeout_s=30)
    try:
        call = upstream.chat_stream(rag_pb2.StreamChatRequest(query="a b", request_id="abort-early"))
        ended: list[str] = []

        class Hooks(NoHooks):
            def ended(self, result: StreamResult) -> None:
                ended.append(result.outcome)

        session = StreamSession(stream_id="s2", request_id="abort-early", owner="o", policy=NO_RESUME)
        session.start(call)
        session.announce(Hooks())
        session.abort()  # same turn as start(): the pump task has not run yet
        await session.wait_closed()
        assert ended == ["cancelled"]
        assert call.cancelled()
    finally:
        await upstream.close()


class RecordingObserver(NullObserver):
    def __init__(self) -> None:
        self.events: list[str] = []

    def stream_opened(self) -> None:
        self.events.append("opened")

    def first_token(self, seconds: float) -> None:
        self.events.append("first_token")

    def stream_closed(self, result: StreamResult) -> None:
        self.events.append(f"closed:{result.outcome}")


class RecordingSink:
    """A resume-store mirror stand-in that keeps what it was offered (the real one needs Redis)."""

    healthy = True
    flushed_seq = 0

    def __init__(self) -> None:
        self.offered: list[int] = []
        self.ended: list[str] = []

    def offer(self, seq: int, data: bytes, final: bool) -> None:
        self.offered.append(seq)

    def end(self, outcome: Outcome) -> None:
        self.ended.append(outcome)

    def reader_attached(self) -> None:
        pass

    def reader_left(self) -> None:
        pass

    async def reader_hold_s(self) -> float:
        return 0.0


async def test_an_opening_session_answers_on_the_first_message_and_tells_nobody_until_announced(
    stub_factory: StubFactory,
) -> None:
    """The HTTP status waits on the first message, not the initial metadata; while it waits, a
    stream the upstream may still refuse must not show up in stats, metrics, hooks or the store,
    and what was written meanwhile still reaches the store once it is announced."""
    stub = stub_factory("--mode", "echo", "--first-token-delay-ms", "30000")
    upstream = Upstream(stub.target, timeout_s=30)
    observer, sink = RecordingObserver(), RecordingSink()
    try:
        call = upstream.chat_stream(rag_pb2.StreamChatRequest(query="a b", request_id="opening"))
        session = StreamSession(stream_id="s3", request_id="opening", owner="o", policy=NO_RESUME, observer=observer)
        session.start(call)
        generation = session.attach(0)
        assert isinstance(generation, int)
        written: list[bytes] = []

        async def write_opening() -> None:  # what the new stream's response has the pump do
            body, last = session.take()
            written.append(body)
            session.acknowledge(last, generation)
            session.release_answer()

        session.park(write_opening)
        assert await asyncio.wait_for(session.answered(10), 10) is None
        session.park(None)
        assert len(written) == 1 and b'"type":"metadata"' in written[0]  # the first message, at once
        assert observer.events == []
        ended: list[str] = []

        class Hooks(NoHooks):
            def ended(self, result: StreamResult) -> None:
                ended.append(result.outcome)

        session.announce(Hooks(), sink)
        assert observer.events == ["opened"] and sink.offered == [1]  # written before, mirrored still
        session.abort()
        await session.wait_closed()
        assert observer.events == ["opened", "closed:cancelled"] and ended == ["cancelled"]
        assert sink.ended == ["cancelled"]
    finally:
        await upstream.close()


async def test_a_refusal_before_any_frame_is_returned_and_never_announced(stub_factory: StubFactory) -> None:
    stub = stub_factory("--mode", "echo")
    upstream = Upstream(stub.target, timeout_s=30)
    observer = RecordingObserver()
    try:
        call = upstream.chat_stream(rag_pb2.StreamChatRequest(query=" ", request_id="refused"))
        session = StreamSession(stream_id="s4", request_id="refused", owner="o", policy=NO_RESUME, observer=observer)
        session.start(call)
        refusal = await asyncio.wait_for(session.answered(10), 10)
        assert isinstance(refusal, BadRequest) and refusal.status == 400
        assert observer.events == []
    finally:
        await upstream.close()


async def test_answered_gives_up_after_the_wait_and_the_read_goes_on() -> None:
    """A RAG service slow to answer: the stream starts (heartbeats cover the wait) and the pending
    gRPC read is not cancelled by the wait's end (cancelling it leaks grpcio memory, see the pump)."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)  # accepts connections, never speaks HTTP/2
    upstream = Upstream(f"127.0.0.1:{silent.getsockname()[1]}", timeout_s=30)
    try:
        call = upstream.chat_stream(rag_pb2.StreamChatRequest(query="a", request_id="silent"))
        session = StreamSession(stream_id="s5", request_id="silent", owner="o", policy=NO_RESUME)
        session.start(call)
        started = time.monotonic()
        assert await session.answered(0.2) is None
        assert 0.15 < time.monotonic() - started < 5
        assert session.result is None and not call.cancelled()  # still reading
        session.announce(NoHooks())
        session.abort()
        await session.wait_closed()
        assert session.result is not None and session.result.outcome == "cancelled"
    finally:
        await upstream.close()
        silent.close()


class SessionOpening:
    """The opener's side of a new stream (``OpenStream``) over a bare session, noting its steps."""

    def __init__(self, session: StreamSession, steps: list[str]) -> None:
        self.session = session
        self.steps = steps

    def park(self, handover: Callable[[], Awaitable[None]] | None) -> None:
        self.session.park(handover)

    async def answered(self) -> BridgeError | None:
        return await self.session.answered(10)

    def release(self) -> None:
        self.session.release_answer()

    @property
    def token_sent(self) -> bool:
        return self.session.token_sent

    def accepted(self) -> None:
        self.steps.append("accepted")
        self.session.announce(NoHooks())

    def refused(self, error: BridgeError) -> None:
        self.steps.append("refused")

    def interrupted(self) -> None:
        self.session.abort()


async def test_a_new_stream_is_written_by_its_pump_until_the_first_token_is_out(
    stub_factory: StubFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The status line and the frames up to the first token leave from the pump, in the turn each
    message arrived; the request task's work (accepting the stream, starting the writer) comes
    after, not between the metadata frame and the first token."""
    monkeypatch.setattr(response_module, "OPENING_HANDOFF_S", 30.0)  # a slow host cannot take over early
    stub = stub_factory("--mode", "echo")
    upstream = Upstream(stub.target, timeout_s=30)
    steps: list[str] = []
    try:
        call = upstream.chat_stream(rag_pb2.StreamChatRequest(query="a b", request_id="opening-writes"))
        session = StreamSession(stream_id="s6", request_id="opening-writes", owner="o", policy=NO_RESUME)
        session.start(call)
        pump = session._pump.task if session._pump is not None else None

        async def send(message: Message) -> None:
            by = "pump" if asyncio.current_task() is pump else "response"
            if message["type"] == "http.response.start":
                steps.append(f"status by {by}")
            elif b'"type":"metadata"' in message.get("body", b""):
                steps.append(f"metadata by {by}")
            if b'"type":"token","index":0' in message.get("body", b""):
                steps.append(f"first token by {by}")

        async def receive() -> Message:
            await asyncio.Event().wait()  # the client never hangs up
            raise AssertionError

        response = EventStreamResponse(session, opening=SessionOpening(session, steps))
        await asyncio.wait_for(response({"type": "http"}, receive, send), 10)
        assert steps[:4] == ["status by pump", "metadata by pump", "first token by pump", "accepted"], steps
        assert session.result is not None and session.result.outcome == "completed"
    finally:
        await upstream.close()
