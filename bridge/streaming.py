"""One stream: an upstream gRPC call pumped into frames, and the HTTP connection that drains them.

The two halves are decoupled on purpose. The ``StreamSession`` owns the gRPC call and a bounded
log of encoded frames; an ``EventStreamResponse`` attaches to it and writes frames to the socket.
That split is what lets a stream survive a dropped connection for ``RESUME_GRACE_S`` and be
continued by a reconnect carrying ``Last-Event-ID``, while with no grace window a disconnect
cancels the gRPC call at once.

Invariants, each preventing a known failure:
- only the pump appends frames and only one writer sends them, so a heartbeat can never land
  inside another frame's bytes;
- the pump waits while ``stream_window_frames`` frames are unsent, so a reader that stops
  reading stops the pump, the gRPC receive window fills and the RAG server pauses (no unbounded
  buffer in the bridge);
- every session ends with exactly one ``done`` or ``error`` frame, or is cancelled because no
  client is left to read one;
- with a ``FrameSink`` (RESUME_STORE), every frame is also offered to the sink in seq order, and a
  detached session drops local frames only once the sink holds them, so a reader on another
  instance never sees a gap and this instance's memory stays bounded while nobody reads here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from bali_zero.rag.v1 import rag_pb2
from bridge import sse
from bridge.errors import BridgeError, from_grpc_status
from bridge.types import NullObserver, Outcome, StreamObserver, StreamResult
from bridge.upstream import StreamCall

log = logging.getLogger("bridge.streaming")

_FINISH_REASONS = {
    rag_pb2.FINISH_REASON_STOP: "stop",
    rag_pb2.FINISH_REASON_LENGTH: "length",
    rag_pb2.FINISH_REASON_UNSPECIFIED: "stop",
}
# Where bridge.app.BridgeApp keeps the server's unwrapped ``send`` in the ASGI scope.
RAW_SEND_KEY = "bridge.raw_send"
# Frames ready together are written in one send, up to this many bytes (write coalescing).
_COALESCE_BYTES = 64 * 1024
# Inter-token gaps go to the observers this many at a time (and at the end of the stream).
GAP_BATCH = 64


@dataclass(frozen=True, slots=True)
class StreamPolicy:
    heartbeat_interval_s: float
    send_timeout_s: float
    resume_grace_s: float
    window_frames: int
    buffer_frames: int
    buffer_bytes: int


def new_stream_id() -> str:
    return secrets.token_urlsafe(12)


_EVENT_ID = re.compile(r"([A-Za-z0-9_-]{1,64}):([0-9]{1,18})", re.ASCII)
_SEQ = re.compile(r"[0-9]{1,18}", re.ASCII)


def parse_event_id(value: str | None) -> tuple[str, int] | None:
    """``"<stream_id>:<seq>"`` → (stream_id, seq); anything else → None.

    Only the alphabet the bridge itself issues is accepted: an id is echoed back in an ``id:``
    field, where CR, LF or NUL would corrupt the stream, and ``str.isdigit`` accepts "²".
    """
    match = _EVENT_ID.fullmatch(value or "")
    return (match.group(1), int(match.group(2))) if match else None


def parse_seq(value: str | None) -> int | None:
    """A bare ``Last-Event-ID`` sequence number (used with ``x-connection-id``)."""
    return int(value) if value and _SEQ.fullmatch(value) else None


class StreamExpired(BridgeError):
    status = 200
    default_code = "STREAM_EXPIRED"


class FramesTrimmed(StreamExpired):
    """The frames after this id left this instance's memory; a shared resume store may hold them."""


class FrameSink(Protocol):
    """Where a session mirrors its frames for readers on other instances (bridge.resume_store).

    ``offer`` runs on the token hot path, so it must never block or await: it queues and returns.
    """

    @property
    def healthy(self) -> bool:
        """False once the sink gave up (store down too long): local rules apply again."""
        ...

    @property
    def flushed_seq(self) -> int:
        """Every frame up to this seq is durably in the store."""
        ...

    def offer(self, seq: int, data: bytes, final: bool) -> None: ...

    def end(self, outcome: Outcome) -> None:
        """The session is over (after its final frame, if it had one): flush, mark, set the TTL."""
        ...

    async def reader_hold_s(self) -> float:
        """Seconds a reader elsewhere still holds the stream (0: nobody; also 0 on any error)."""
        ...


class FrameSource(Protocol):
    """What ``EventStreamResponse`` drains: a local ``StreamSession`` or a reader of the store."""

    stream_id: str
    request_id: str
    policy: StreamPolicy
    generation: int
    finished: bool
    sent_seq: int

    def attach(self, after_seq: int) -> int: ...

    def detach(self, generation: int) -> None: ...

    def release(self, generation: int) -> None: ...

    def take(self) -> tuple[bytes, int]: ...

    def acknowledge(self, seq: int, generation: int) -> None: ...

    async def changed(self) -> None: ...

    def wake(self) -> None: ...


class Notifier:
    """A level-triggered wake-up: one future per wait, no timer.

    The writer waits here between frames; heartbeats and the send timeout come from one periodic
    timer per stream instead of a timeout around every wait (``asyncio.timeout()`` there cost
    several percent of a core at full token throughput).
    """

    __slots__ = ("_flag", "_waiter")

    def __init__(self) -> None:
        self._flag = False
        self._waiter: asyncio.Future[None] | None = None

    def notify(self) -> None:
        self._flag = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        """Return once notified (at once if already), consuming the notification."""
        if not self._flag:
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        self._flag = False


class Wakeable:
    """The writer's wait of a ``FrameSource``: one ``Notifier``, shared by local and remote sources."""

    _changed: Notifier

    async def changed(self) -> None:
        """Wait until a frame is appended, the source finishes, or ``wake`` is called."""
        await self._changed.wait()

    def wake(self) -> None:
        self._changed.notify()


def coalesce(frames: deque[tuple[int, bytes]], total_bytes: int, sent_seq: int) -> tuple[bytes, int]:
    """Queued frames joined for one write (at most ~64 KiB), and the last seq included."""
    if not frames:
        return b"", sent_seq
    if len(frames) == 1 or total_bytes <= _COALESCE_BYTES:
        return b"".join(data for _, data in frames), frames[-1][0]
    parts: list[bytes] = []
    size = 0
    last = sent_seq
    for seq, data in frames:
        if parts and size + len(data) > _COALESCE_BYTES:
            break
        parts.append(data)
        size += len(data)
        last = seq
    return b"".join(parts), last


class StreamSession(Wakeable):
    """The upstream half of a stream; see the module docstring."""

    def __init__(
        self,
        *,
        stream_id: str,
        request_id: str,
        owner: str,
        policy: StreamPolicy,
        observer: StreamObserver | None = None,
        on_end: Callable[[StreamSession, StreamResult], None] | None = None,
        on_first_token: Callable[[float], None] | None = None,
        on_settled: Callable[[StreamResult], None] | None = None,
        trace_id: str | None = None,
        sink: FrameSink | None = None,
    ) -> None:
        self.stream_id = stream_id
        self.request_id = request_id
        self.owner = owner
        self.policy = policy
        self.observer: StreamObserver = observer or NullObserver()
        self.on_end = on_end
        self.on_first_token = on_first_token
        self.on_settled = on_settled
        self._settled = False
        self.trace_id = trace_id
        self.sink = sink
        self.started = time.monotonic()
        # Frames not yet written to a reader, and (with a resume window) frames already written,
        # kept so a reconnect can be served from any id still held.
        self._unsent: deque[tuple[int, bytes]] = deque()
        self._unsent_bytes = 0
        self._sent: deque[tuple[int, bytes]] = deque()
        self._sent_bytes = 0
        self.last_seq = 0
        self.sent_seq = 0
        self.finished = False
        self.result: StreamResult | None = None
        self.attached = True  # the first reader attaches right after the call opens
        self.generation = 0
        self.expired = False
        self._changed = Notifier()
        self._space = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None
        self._call: StreamCall | None = None  # the call being pumped (a retry replaces it)
        self._pumping = False  # the pump task has run its first step
        self._abort_pending = False
        self._grace: asyncio.TimerHandle | None = None
        self._tokens = 0
        self._first_token_at: float | None = None
        self._last_token_at: float | None = None
        self._gaps: list[float] = []
        self._id_prefix = f"{stream_id}:"
        self._abort_error: BridgeError | None = None
        self._retry: Callable[[], StreamCall] | None = None
        self._metadata_sent = False
        self._stopped = False
        # Frames up to this seq were dropped locally because the sink holds them (FramesTrimmed).
        self._trimmed_through = 0
        self._hold_check: asyncio.Task[None] | None = None

    # -- upstream side -------------------------------------------------------------------------

    def start(self, call: StreamCall, retry: Callable[[], StreamCall] | None = None) -> None:
        """Begin pumping ``call`` into frames.

        ``retry`` opens the same call again: used once, when the call fails with UNAVAILABLE
        before any token was produced (a replica died after accepting), so the answer comes from
        another replica instead of an error. Never after a token: the client would see it twice.
        """
        self._retry = retry
        self.observer.stream_opened()
        self._call = call
        self._pump = asyncio.get_running_loop().create_task(self._run(call))

    async def _run(self, call: StreamCall) -> None:
        outcome: Outcome = "error"
        error: BridgeError | None = None
        finish_reason: str | None = None
        self._pumping = True
        try:
            if self._abort_pending:
                raise asyncio.CancelledError
            while finish_reason is None:
                try:
                    message = await call.read()
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.UNAVAILABLE or self._tokens or self._retry is None:
                        raise
                    call.cancel()
                    call, self._retry = self._retry(), None
                    self._call = call
                    continue
                if message is grpc.aio.EOF:
                    error = BridgeError("the RAG service ended the stream without completing it",
                                        code="UPSTREAM_PROTOCOL", retryable=True)
                    break
                finish_reason = self._handle(message)
                if finish_reason is None and self._needs_room():
                    await self._make_room()
            if finish_reason is not None:
                outcome = "completed"
        except grpc.aio.AioRpcError as exc:
            error = from_grpc_status(exc.code(), exc.details())
        except asyncio.CancelledError:
            outcome = "cancelled"
            error = self._abort_error
            if error is not None and not self._stopped:
                outcome = "error"
        except Exception:  # pragma: no cover - a bug must still end the stream with a frame
            log.exception("stream %s failed", self.stream_id)
            error = BridgeError("internal error in the bridge", code="INTERNAL", retryable=True)
        finally:
            if outcome != "completed":
                # A completed call ends with the server's OK status; cancelling it here would turn
                # every finished stream into a CANCELLED client span.
                call.cancel()
            # A finished call holds ~30 KiB of grpc state and the session outlives it by the resume
            # window: keeping it that long added ~8 MiB to the soak's working set.
            self._call = None
            result = self._result(outcome, error, finish_reason)
            if outcome == "completed":
                self._append(sse.json_frame(self._next_id(), self._done_payload(result)), final=True)
            elif error is not None:
                prefix = sse.retry_field(int(error.retry_after_s * 1000)) if error.retry_after_s else b""
                self._append(prefix + sse.json_frame(self._next_id(), error.frame()), final=True)
            self._finish(result)

    def _handle(self, message: rag_pb2.StreamChatResponse) -> str | None:
        """Turn one upstream message into a frame; the finish reason once the answer completed.

        Synchronous on purpose: the pump awaits only for the next message and, when the reader
        falls a window behind, for room (one coroutine hop per token instead of three).
        """
        kind = message.WhichOneof("event")
        if kind == "token":
            now = time.monotonic()
            if self._first_token_at is None:
                self._first_token_at = now
                self.observer.first_token(now - self.started)
                if self.on_first_token is not None:
                    self.on_first_token(round((now - self.started) * 1000, 3))
            else:
                assert self._last_token_at is not None
                gaps = self._gaps
                gaps.append(now - self._last_token_at)
                if len(gaps) >= GAP_BATCH:
                    self._flush_gaps()
            self._last_token_at = now
            self._tokens += 1
            token = message.token
            self._append(sse.token_frame(self._next_id(), token.index, token.text))
            return None
        if kind == "metadata":
            if self._metadata_sent:
                return None  # a retried call's metadata: the client already has one
            self._metadata_sent = True
            meta = message.metadata
            payload: dict[str, Any] = {
                "type": "metadata",
                "stream_id": self.stream_id,
                "request_id": self.request_id,
                "model": meta.model,
                "sources": [{"title": s.title, "uri": s.uri, "score": s.score} for s in meta.sources],
            }
            self._append(sse.json_frame(self._next_id(), payload))
            return None
        if kind == "completion":
            return _FINISH_REASONS.get(message.completion.finish_reason, "stop")
        return None  # an event type newer than this bridge: skip it

    def _next_id(self) -> str:
        return f"{self._id_prefix}{self.last_seq + 1}"

    def _flush_gaps(self) -> None:
        """Hand the gaps collected so far to the observers in one call (one per token cost ~7 us)."""
        if self._gaps:
            self.observer.token_gaps(self._gaps)
            self._gaps = []

    def _needs_room(self) -> bool:
        if self.attached:
            return self.last_seq - self.sent_seq >= self.policy.window_frames
        return self._unsent_over_cap()

    async def _make_room(self) -> None:
        # Back-pressure: wait while the attached reader is behind by a full window.
        while self.attached and self.last_seq - self.sent_seq >= self.policy.window_frames:
            self._space.clear()
            await self._space.wait()
        if not self.attached and self._unsent_over_cap():
            if self.sink is not None and self.sink.healthy:
                # Frames flow to the store, where a reader elsewhere may be taking them: the local
                # cap is about memory, not about "nobody reads", so drop what the store holds.
                self._trim_mirrored()
                return
            self.expired = True
            raise asyncio.CancelledError  # nobody is reading and the replay buffer is full

    def _append(self, data: bytes, final: bool = False) -> None:
        self.last_seq += 1
        self._unsent.append((self.last_seq, data))
        self._unsent_bytes += len(data)
        if self.sink is not None:
            self.sink.offer(self.last_seq, data, final)
        if final:
            self.finished = True
        self._changed.notify()

    def _trim_mirrored(self) -> None:
        """Drop the oldest local frames that the sink already holds, down to the cap."""
        assert self.sink is not None
        flushed = self.sink.flushed_seq
        while self._sent:
            seq, data = self._sent.popleft()
            self._sent_bytes -= len(data)
            self._trimmed_through = max(self._trimmed_through, seq)
        while self._unsent and self._unsent[0][0] <= flushed and self._unsent_over_cap():
            seq, data = self._unsent.popleft()
            self._unsent_bytes -= len(data)
            self._trimmed_through = seq

    def _unsent_over_cap(self) -> bool:
        return len(self._unsent) > self.policy.buffer_frames or self._unsent_bytes > self.policy.buffer_bytes

    def _result(self, outcome: Outcome, error: BridgeError | None, finish_reason: str | None) -> StreamResult:
        now = time.monotonic()
        first = None if self._first_token_at is None else (self._first_token_at - self.started) * 1000
        return StreamResult(
            stream_id=self.stream_id,
            request_id=self.request_id,
            outcome=outcome,
            tokens=self._tokens,
            duration_ms=round((now - self.started) * 1000, 3),
            first_token_ms=None if first is None else round(first, 3),
            error_code=None if error is None else error.code,
            finish_reason=finish_reason,
            trace_id=self.trace_id,
        )

    @staticmethod
    def _done_payload(result: StreamResult) -> dict[str, Any]:
        return {
            "type": "done",
            "finish_reason": result.finish_reason,
            "metrics": {
                "first_token_ms": result.first_token_ms,
                "tokens": result.tokens,
                "duration_ms": result.duration_ms,
            },
        }

    def _finish(self, result: StreamResult) -> None:
        if self.result is not None:
            return
        self.result = result
        self.finished = True
        self._changed.notify()
        self._flush_gaps()
        self.observer.stream_closed(result)
        if self.sink is not None:
            self.sink.end(result.outcome)
        if self.on_end is not None:
            self.on_end(self, result)
        if not self.attached:
            self._settle()  # no reader here to deliver the final frame

    def _settle(self) -> None:
        """Fire ``on_settled`` once, when the final frame was written or can no longer be.

        A trace span ended at upstream completion would close before the client saw ``done``.
        """
        if self._settled or self.result is None:
            return
        self._settled = True
        if self.on_settled is not None:
            self.on_settled(self.result)

    def abort(self, error: BridgeError | None = None) -> None:
        """Stop the upstream call now; with ``error`` the reader gets it as the final frame."""
        self._abort_error = error
        if self._pump is None or self._pump.done():
            return
        if self._call is not None:
            # Cancel upstream now, not when the pump task next runs: under load that is several
            # event-loop turns later, and the RAG server keeps generating for a client that left.
            self._call.cancel()
        if not self._pumping:
            # Cancelling a task before its first step skips the coroutine body, ``finally`` and
            # all: no final frame, no on_end (the stream slot would leak), the call left open.
            self._abort_pending = True
            return
        self._pump.cancel()

    def stop(self) -> None:
        """An explicit stop (DELETE): cancel upstream, and tell a reader still attached why.

        Without a final frame an EventSource would take the closed response for a dropped
        connection and reconnect; STREAM_CANCELLED (not retryable) ends it for good.
        """
        self._stopped = True
        self.abort(BridgeError("the stream was stopped", code="STREAM_CANCELLED", retryable=False))

    async def wait_closed(self) -> None:
        if self._pump is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._pump)

    # -- reader side ---------------------------------------------------------------------------

    def check_resumable(self, after_seq: int) -> None:
        """Raise StreamExpired unless every frame after ``after_seq`` can still be sent."""
        if self.expired or (self.result is not None and self.result.outcome == "cancelled"):
            raise StreamExpired("the stream expired before it was resumed", retryable=False)
        if after_seq > self.last_seq:
            raise StreamExpired("this event id was never sent", retryable=False)
        if after_seq < self._trimmed_through:
            raise FramesTrimmed("the frames after this event id are no longer held here", retryable=False)
        if after_seq < self.sent_seq and not (self._sent and self._sent[0][0] <= after_seq + 1):
            raise StreamExpired("the frames after this event id are no longer held", retryable=False)

    def attach(self, after_seq: int) -> int:
        """A reader takes the stream from ``after_seq``; returns its generation.

        A newer reader supersedes an older one (a browser that reconnected before the bridge saw
        the old socket die); the older writer notices the generation change and stops without
        touching the session.
        """
        self.check_resumable(after_seq)
        while self._sent and self._sent[-1][0] > after_seq:  # rewind: resend what the reader missed
            seq, data = self._sent.pop()
            self._sent_bytes -= len(data)
            self._unsent.appendleft((seq, data))
            self._unsent_bytes += len(data)
        keep = self.policy.resume_grace_s > 0
        while self._unsent and self._unsent[0][0] <= after_seq:  # the reader has these (e.g. from
            item = self._unsent.popleft()                       # another instance): no duplicates
            self._unsent_bytes -= len(item[1])
            if keep:
                self._sent.append(item)
                self._sent_bytes += len(item[1])
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        self.attached = True
        self.sent_seq = after_seq
        self.generation += 1
        self._changed.notify()
        return self.generation

    def detach(self, generation: int) -> None:
        """The reader went away: cancel now, or keep running for the resume grace window.

        Idempotent: the disconnect watcher and the response's cleanup both call it, and a second
        grace timer would outlive a resume that cancelled the first.
        """
        if generation != self.generation or not self.attached:
            return
        self.attached = False
        self._space.set()
        if self.finished:
            self._settle()
            if not self._unsent:
                return
        if self.policy.resume_grace_s <= 0:
            self.abort()
            return
        self._grace = asyncio.get_running_loop().call_later(self.policy.resume_grace_s, self._expire)

    def release(self, generation: int) -> None:
        """The reader of ``generation`` wrote the final frame and closed normally."""
        if generation == self.generation:
            self.attached = False
            self._settle()

    def _expire(self) -> None:
        self._grace = None
        if self.attached:
            return
        if self.sink is not None and self.sink.healthy and not self.finished:
            # A reader on another instance may be draining the store: ask before cancelling.
            self._hold_check = asyncio.get_running_loop().create_task(self._expire_unless_held())
            return
        self.expired = True
        self.abort()

    async def _expire_unless_held(self) -> None:
        """Re-arm the grace timer for as long as a remote reader keeps its reader key alive.

        Without this, instance A would cancel upstream at its grace expiry while instance B is
        still streaming the answer to the reconnected client, cutting that answer short.
        """
        assert self.sink is not None
        hold = await self.sink.reader_hold_s()
        if self.attached or self._grace is not None or self.finished:
            return
        if hold > 0:
            self._grace = asyncio.get_running_loop().call_later(hold, self._expire)
            return
        self.expired = True
        self.abort()

    def take(self) -> tuple[bytes, int]:
        """Unsent frames joined for one write (at most ~64 KiB), and the last seq included."""
        return coalesce(self._unsent, self._unsent_bytes, self.sent_seq)

    def acknowledge(self, seq: int, generation: int) -> None:
        """Frames up to ``seq`` were handed to the socket by the reader of ``generation``."""
        if generation != self.generation:
            return
        keep = self.policy.resume_grace_s > 0
        while self._unsent and self._unsent[0][0] <= seq:
            item = self._unsent.popleft()
            self._unsent_bytes -= len(item[1])
            if keep:
                self._sent.append(item)
                self._sent_bytes += len(item[1])
        while self._sent and (
            len(self._sent) > self.policy.buffer_frames or self._sent_bytes > self.policy.buffer_bytes
        ):
            self._sent_bytes -= len(self._sent.popleft()[1])
        self.sent_seq = seq
        self._space.set()

class ClientGone(Exception):
    """The HTTP client disconnected or stopped reading for longer than SEND_TIMEOUT_S."""


class EventStreamResponse:
    """The HTTP half: writes a session's frames, heartbeats in the gaps, and watches for disconnect."""

    media_type = "text/event-stream; charset=utf-8"

    def __init__(
        self,
        session: FrameSource,
        after_seq: int = 0,
        *,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.session = session
        self.after_seq = after_seq
        self.headers = headers or {}
        self._send_since: float | None = None  # loop time at which the current send began
        self._timer: asyncio.TimerHandle | None = None
        self._last_write = 0.0  # loop time of the last write (heartbeats fill the gaps)
        self._heartbeat_due = False

    def _raw_headers(self) -> list[tuple[bytes, bytes]]:
        base = {
            "content-type": self.media_type,
            "cache-control": "no-cache, no-transform",
            "x-accel-buffering": "no",
            "connection": "keep-alive",
            "x-connection-id": self.session.stream_id,
            "x-request-id": self.session.request_id,
            "x-heartbeat-interval": f"{self.session.policy.heartbeat_interval_s:g}",
        }
        base.update({k.lower(): v for k, v in self.headers.items()})
        return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in base.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Headers go through the middleware stack (CORS adds its headers there); body chunks go
        # straight to the server's own send, skipping a wrapper per middleware layer per token
        # (a few percent of a core at full throughput; see bridge.app.BridgeApp). No middleware
        # may rewrite an event stream's body anyway: compression would hold frames back.
        body_send: Send = scope.get(RAW_SEND_KEY, send)
        session = self.session
        try:
            generation = session.attach(self.after_seq)
        except StreamExpired as exc:  # expired between the resume check and now
            await ErrorFrameResponse(f"{session.stream_id}:{self.after_seq}", exc)(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 200, "headers": self._raw_headers()})
        writer = asyncio.ensure_future(self._write(body_send, generation))
        watcher = asyncio.ensure_future(self._watch(receive, generation))
        self._start_timer(writer)
        completed = False
        try:
            done, _ = await asyncio.wait({writer, watcher}, return_when=asyncio.FIRST_COMPLETED)
            completed = writer in done and not writer.cancelled() and writer.exception() is None
        finally:
            if self._timer is not None:
                self._timer.cancel()
            for task in (writer, watcher):
                task.cancel()
            await asyncio.gather(writer, watcher, return_exceptions=True)
            if completed:
                session.release(generation)
                with contextlib.suppress(Exception):
                    await body_send({"type": "http.response.body", "body": b"", "more_body": False})
            else:
                session.detach(generation)

    def _start_timer(self, writer: asyncio.Future[None]) -> None:
        """One timer per stream for both heartbeats and the send timeout.

        It fires when a heartbeat falls due (HEARTBEAT_INTERVAL_S after the last write), and at
        least every SEND_TIMEOUT_S; a send blocked for SEND_TIMEOUT_S cancels the writer, found
        within about one more period. A busy stream sees a tick per min(interval, timeout); no
        timer is armed per token or per wait.
        """
        loop = asyncio.get_running_loop()
        policy = self.session.policy
        interval, limit = policy.heartbeat_interval_s, policy.send_timeout_s

        def tick() -> None:
            now = loop.time()
            since = self._send_since
            if since is not None:  # a send is under way: due to time out at since + limit
                if now - since >= limit:
                    writer.cancel()
                    return
                next_at = since + limit
            else:
                next_at = self._last_write + interval
                if now >= next_at:
                    self._heartbeat_due = True
                    self.session.wake()
                    next_at = now + interval
                # A send may start right after this tick: look again within SEND_TIMEOUT_S.
                next_at = min(next_at, now + limit)
            self._timer = loop.call_at(next_at, tick)

        self._last_write = loop.time()
        self._timer = loop.call_at(self._last_write + min(interval, limit), tick)

    async def _write(self, send: Send, generation: int) -> None:
        session = self.session
        while session.generation == generation:
            body, last = session.take()
            if body:
                await self._send(send, body)
                session.acknowledge(last, generation)
                continue
            if session.finished:
                return
            if self._heartbeat_due:
                self._heartbeat_due = False
                heartbeat = sse.frame(f"{session.stream_id}:{session.sent_seq}", '{"type":"heartbeat"}',
                                      event="heartbeat")
                await self._send(send, heartbeat)
                continue
            await session.changed()

    async def _send(self, send: Send, body: bytes) -> None:
        loop = asyncio.get_running_loop()
        self._send_since = loop.time()
        try:
            await send({"type": "http.response.body", "body": body, "more_body": True})
        except OSError as exc:
            raise ClientGone(str(exc)) from None
        finally:
            self._send_since = None
            self._last_write = loop.time()

    async def _watch(self, receive: Receive, generation: int) -> None:
        """Wait for the client to hang up, then detach at once.

        Detaching here rather than after the writer has been cancelled and collected saves the
        event-loop turns in between: under load each turn is milliseconds, and the upstream call
        (cancelled by ``detach`` when there is no resume window) would keep running meanwhile.
        Detaching twice is harmless: the response's own ``detach`` in ``__call__`` then finds the
        reader already gone.
        """
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.session.detach(generation)
                return


class ErrorFrameResponse(Response):
    """A whole event stream made of one ``error`` frame: the answer to a late or invalid resume.

    Sent as raw ASGI messages like every other event stream (a Starlette ``Response`` would add a
    Content-Length, which an event stream never carries).
    """

    def __init__(self, event_id: str, error: BridgeError) -> None:
        self.event_id = event_id
        self.error = error
        self.status_code = 200
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [
            (b"content-type", EventStreamResponse.media_type.encode()),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        body = sse.json_frame(self.event_id, self.error.frame())
        await send({"type": "http.response.body", "body": body, "more_body": False})
