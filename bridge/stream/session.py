"""One local stream: the upstream pump's frames in a replay log, drained by one HTTP reader.

The two halves are decoupled on purpose. The session owns the gRPC call (through its pump) and a
bounded log of encoded frames; an ``EventStreamResponse`` attaches to it and writes frames to the
socket. That split is what lets a stream survive a dropped connection for ``RESUME_GRACE_S`` and
be continued by a reconnect carrying ``Last-Event-ID``, while with no grace window a disconnect
cancels the gRPC call at once.

Invariants, each preventing a known failure:
- only the pump appends frames and one write is under way at a time (the pump's while a new
  stream opens, see ``park``, then the response's writer's), so a heartbeat can never land
  inside another frame's bytes;
- the pump waits while ``window_frames`` frames are unsent, so a reader that stops reading stops
  the pump, the gRPC receive window fills and the RAG server pauses (no unbounded buffer here);
- every session ends with exactly one ``done`` or ``error`` frame, or is cancelled because no
  client is left to read one;
- with a ``FrameSink`` (RESUME_STORE), every frame is also offered to the sink in seq order, and a
  detached session drops local frames only once the sink holds them, so a reader on another
  instance never sees a gap and this instance's memory stays bounded while nobody reads here.

The session coordinates; its parts follow it in this module, each with its own rules: who hears
of the stream and when (``Audience``), the opener's wait for the first answer (``FirstAnswer``),
back-pressure (``Room``), attach/detach/grace (``Lifecycle``), token timing (``TokenClock``). The
gRPC read loop and its retry are the pump's (bridge/stream/pump.py), the resume rules the replay
log's (bridge/stream/replay.py). No part holds a reference back to the session: a session ↔ part
cycle would leave every ended session to the cyclic garbage collector (tests/e2e/test_memory_streams.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from bridge.errors import BadRequest, BridgeError, StreamExpired, UpstreamError
from bridge.stream.frames import FrameEncoder, StreamEncoder, finish_reason
from bridge.stream.pump import UpstreamPump
from bridge.stream.replay import FrameLog, Resume, plan_resume, refusal
from bridge.stream.source import FrameSink, Notifier, StreamPolicy
from bridge.types import NullObserver, Outcome, StreamObserver, StreamResult
from bridge.upstream import ChatStream


class StreamSession:
    """The upstream half of a stream, coordinating the parts in bridge/stream/ (module docstring).

    No part holds a reference back to the session: a cycle would leave ended sessions to the GC.
    """

    def __init__(
        self,
        *,
        stream_id: str,
        request_id: str,
        owner: str,
        policy: StreamPolicy,
        observer: StreamObserver | None = None,
        trace_id: str | None = None,
        sink: FrameSink | None = None,
        started: float | None = None,
        encoder: StreamEncoder | None = None,
    ) -> None:
        """``started``: the monotonic time the stream's latencies count from (default: now);
        ``encoder``: the bytes of its frames (default: the native ``FrameEncoder``; see
        bridge/stream/face.py)."""
        self.stream_id = stream_id
        self.request_id = request_id
        self.owner = owner
        self.policy = policy
        self.trace_id = trace_id
        self.audience = Audience(observer or NullObserver())
        self.sink = sink
        self.log = FrameLog(
            keep_sent=policy.resume_grace_s > 0, max_frames=policy.buffer_frames, max_bytes=policy.buffer_bytes
        )
        self.encoder: StreamEncoder = encoder or FrameEncoder(stream_id, request_id)
        self.clock = TokenClock(self.audience.observer, started)
        self.lifecycle = Lifecycle(policy.resume_grace_s)
        self.finished = False
        self.result: StreamResult | None = None
        self._metadata_sent = False
        self._changed = Notifier()
        self._room = Room(self.log, self.lifecycle, policy.window_frames)
        self._pump: UpstreamPump | None = None
        self._answer = FirstAnswer()
        self.handover: Callable[[], Awaitable[None]] | None = None  # see park()
        self._unreadable_end: BridgeError | None = None  # see refuse_reconnects()

    # -- read by the response and the endpoints -------------------------------------------------

    @property
    def generation(self) -> int:
        return self.lifecycle.generation

    @property
    def sent_seq(self) -> int:
        return self.log.sent_seq

    @property
    def last_seq(self) -> int:
        return self.log.last_seq

    @property
    def reader_left_at(self) -> float | None:
        """``time.monotonic()`` when the last reader left; None while one reads."""
        return self.lifecycle.left_at

    @property
    def resumable(self) -> bool:
        """A reconnect with ``Last-Event-ID`` may continue it (not a stream of the OpenAI face)."""
        return self.encoder.resumable

    @property
    def token_sent(self) -> bool:
        return self.clock.tokens > 0

    @property
    def readable(self) -> bool:
        """A client can still read what this stream produces: its reader is attached here, or its
        frames reach the shared resume store, where a reconnect to another instance reads them."""
        return self.lifecycle.attached or (self.sink is not None and self.sink.healthy)

    @property
    def upstream_open(self) -> bool:
        """The pump is still running: reading, or waiting for the status of a completed call."""
        return self._pump is not None and self._pump.running

    # -- opening ---------------------------------------------------------------------------------

    def start(self, call: ChatStream) -> None:
        """Begin pumping ``call`` into frames; the stream is being opened (bridge.stream.opener).

        The pump reads at once, but observers, hooks and the sink hear of the stream only from
        ``announce``, so a call the RAG service refuses before answering leaves no trace but the
        refusal.
        """
        # The first frames may be written before the stream is announced (see
        # EventStreamResponse): kept until then, so a sink attached by ``announce`` gets them.
        self.log.keep_sent_frames(True)
        self._pump = UpstreamPump(call, self)
        self._pump.start()

    async def answered(self, wait_s: float) -> BridgeError | None:
        """Wait until ``release_answer`` (by the response, once the first frames are out), the end
        of the stream, or ``wait_s`` elapsed.

        Returns the refusal (a gRPC status before any frame, answered as an HTTP error), else
        None. See ``FirstAnswer`` for why the status waits on the first message.
        """
        if self.result is None:
            await self._answer.wait(wait_s)
        return self.refusal

    @property
    def refusal(self) -> BridgeError | None:
        """The gRPC status that ended the stream before any frame (answered over HTTP), if any."""
        return self._answer.refused if self.result is not None else None

    def release_answer(self) -> None:
        """End a pending ``answered`` wait now."""
        self._answer.release()

    def announce(self, hooks: StreamHooks, sink: FrameSink | None = None) -> None:
        """The opener accepted the stream: from now on the observers, hooks and sink hear of it.

        What happened while it was being opened is told now, in order: the frames (to the sink),
        the first token, the end.
        """
        if not self.audience.accept(hooks):
            return
        if sink is not None:
            self.sink = sink
            for seq, data in self.log.held():  # written while opening, or not yet
                sink.offer(seq, data, self.finished and seq == self.log.last_seq)
        self.log.keep_sent_frames(self.policy.resume_grace_s > 0)
        self.audience.report_first_token()
        if self.result is not None:
            self._announce_end(self.result)

    # -- upstream side (PumpTarget) --------------------------------------------------------------

    def on_message(self, message: Any) -> str | None:
        """Turn one upstream message into a frame; the finish reason once the answer completed.

        Synchronous on purpose: the pump awaits only for the next message and, when the reader
        falls a window behind, for room (one coroutine hop per token instead of three).
        """
        kind = message.WhichOneof("event")
        if kind == "token":
            first_s = self.clock.token()
            self._append(self.encoder.token(self.log.last_seq + 1, self.clock.tokens - 1, message.token))
            if first_s is not None:
                self.audience.first_token_measured(first_s)
            return None
        if kind == "metadata":
            if self._metadata_sent:
                return None  # a retried call's metadata: the client already has one
            self._metadata_sent = True
            self._append(self.encoder.metadata(self.log.last_seq + 1, message.metadata))
            return None
        if kind == "completion":
            return finish_reason(message.completion)
        return None  # an event type newer than this bridge: skip it

    def needs_room(self) -> bool:
        return self._room.needed()

    async def make_room(self) -> bool:
        """Back-pressure (``Room``): False once the stream expired instead."""
        return await self._room.make(self.sink)

    def pump_ended(self, outcome: Outcome, error: BridgeError | None, reason: str | None) -> None:
        result = self.clock.result(self.stream_id, self.request_id, outcome, error, reason, self.trace_id)
        if self.log.last_seq == 0 and isinstance(error, UpstreamError | BadRequest):
            self._answer.refused = error  # a gRPC status before any frame: the opener answers it over HTTP
        if outcome == "completed":
            self._append(self.encoder.done(self.log.last_seq + 1, result), final=True)
        elif error is not None:
            self._append(self.encoder.error(self.log.last_seq + 1, error), final=True)
        if self.result is not None:
            return
        self.result = result
        self.finished = True
        self._changed.notify()
        self._answer.release()
        self.clock.flush()
        if self.audience.announced:
            self._announce_end(result)

    def _append(self, data: bytes, final: bool = False) -> None:
        seq = self.log.append(data)
        if self.sink is not None:
            self.sink.offer(seq, data, final)
        if final:
            self.finished = True
        self._changed.notify()

    def _announce_end(self, result: StreamResult) -> None:
        self.audience.ended(result, self.sink)
        if not self.lifecycle.attached:
            self._settle()  # no reader here to deliver the final frame

    def _settle(self) -> None:
        if self.result is not None:
            self.audience.settle(self.result)

    def abort(self, error: BridgeError | None = None) -> None:
        """Stop the upstream call now; with ``error`` the reader gets it as the final frame."""
        if self._pump is not None:
            self._pump.abort(error)

    def refuse_reconnects(self, error: BridgeError) -> None:
        """This instance takes no reconnect any more (it drains): once no client can read the
        stream (``readable``), end it with ``error`` instead of keeping it for a resume window."""
        self._unreadable_end = error
        if not self.finished and not self.readable:
            self.abort(error)

    def stop(self) -> None:
        """An explicit stop (DELETE): cancel upstream, and tell a reader still attached why.

        Without a final frame an EventSource would take the closed response for a dropped
        connection and reconnect; STREAM_CANCELLED (not retryable) ends it for good.
        """
        if self._pump is not None:
            self._pump.abort(
                BridgeError("the stream was stopped", code="STREAM_CANCELLED", retryable=False), stopped=True
            )

    async def wait_closed(self) -> None:
        if self._pump is not None:
            await self._pump.wait_closed()

    # -- lifecycle owner -------------------------------------------------------------------------

    def remote_hold(self) -> Awaitable[float] | None:
        return self.sink.reader_hold_s() if self.sink is not None and self.sink.healthy else None

    def expire(self) -> None:
        self.abort()

    # -- reader side (FrameSource) ---------------------------------------------------------------

    def resume(self, after_seq: int) -> Resume | StreamExpired:
        """Can a reconnect after ``after_seq`` be served, and from where? (bridge/stream/replay.py)"""
        return plan_resume(self.log, after_seq, over=self._over(), finished=self.finished)

    def _over(self) -> bool:
        """Expired, or cancelled: nothing may be resumed any more."""
        return self.lifecycle.expired or (self.result is not None and self.result.outcome == "cancelled")

    def attach(self, after_seq: int) -> int | BridgeError:
        """A reader takes the stream from ``after_seq``: its generation, or why it cannot."""
        refused = refusal(self.log, after_seq, over=self._over())
        if refused is not None:
            return refused
        self.log.rewind(after_seq)  # resend what the reader missed, not what it already has
        generation = self.lifecycle.attach()
        if self.sink is not None:
            self.sink.reader_attached()
        self._changed.notify()
        return generation

    def detach(self, generation: int) -> None:
        """The reader went away: cancel now, or keep running for the resume grace window."""
        if not self.lifecycle.detach(generation):
            return
        self._room.freed()
        self._reader_left()
        if self.finished:
            self._settle()
            if not self.log.has_unsent:
                return
        if self.policy.resume_grace_s <= 0:
            self.abort()
            return
        if self._unreadable_end is not None and not self.readable:
            self.abort(self._unreadable_end)  # no reconnect can reach it: no window to wait out
            return
        self.lifecycle.start_grace(self)

    def release(self, generation: int) -> None:
        """The reader of ``generation`` wrote the final frame and closed normally."""
        if self.lifecycle.release(generation):
            self._settle()
            self._reader_left()

    def _reader_left(self) -> None:
        """The reader here left: the sink holds an ended stream's frames a window from now too, as
        the registry does here, so the client's reconnect may land on any instance.

        Told while the stream still runs as well: a sink still counting a reader here once the
        stream ended would hold its keys for as long as that reader is attached, i.e. up to their
        ceiling (four windows) after an end nobody is reading.
        """
        if self.sink is not None:
            self.sink.reader_left()

    def take(self) -> tuple[bytes, int]:
        """Unsent frames joined for one write (at most ~64 KiB), and the last seq included."""
        return self.log.take()

    def acknowledge(self, seq: int, generation: int) -> None:
        """Frames up to ``seq`` were handed to the socket by the reader of ``generation``."""
        if generation != self.lifecycle.generation:
            return
        self.log.acknowledge(seq)
        self._room.freed()

    async def changed(self) -> None:
        await self._changed.wait()

    def park(self, handover: Callable[[], Awaitable[None]] | None) -> None:
        """While a new stream opens, the pump awaits ``handover`` right after each frame it
        appends (see EventStreamResponse); None ends that."""
        self.handover = handover

    def wake(self) -> None:
        self._changed.notify()


# ------------------------------------------------------------------------- who hears of the stream
class StreamHooks(Protocol):
    """What the code that opened a stream wants to hear about it (bridge.stream.opener)."""

    def first_token(self, ms: float) -> None: ...

    def ended(self, result: StreamResult) -> None:
        """Upstream is over (the final frame, if any, is queued)."""
        ...

    def settled(self, result: StreamResult) -> None:
        """The final frame was written, or no reader is left to write it to."""
        ...


class NoHooks:
    def first_token(self, ms: float) -> None:
        pass

    def ended(self, result: StreamResult) -> None:
        pass

    def settled(self, result: StreamResult) -> None:
        pass


class Audience:
    """Who hears of one stream: its observer (metrics, logs) and the opener's hooks (span, audit, caps).

    Keeps the rules of telling them apart from the session's frame handling:

    - while a stream is being opened nobody hears of it, so a call the RAG service refuses before
      answering leaves no trace but the refusal (no opened/closed pair in the metrics, no audit
      record); what happened meanwhile (the first token, the end) is told by ``accept``, in order;
    - the first token is reported after its frame is on the way, never on the path to the socket;
    - ``settled`` reaches the hooks exactly once, and dropping the hooks then ends the session ↔
      hooks reference cycle, so an ended session is freed by reference counting, not left to the GC.
    """

    __slots__ = ("_first_token_s", "_settled", "announced", "hooks", "observer")

    def __init__(self, observer: StreamObserver) -> None:
        """A stream being opened: unheard of until ``accept``."""
        self.observer = observer
        self.hooks: StreamHooks = NoHooks()
        self.announced = False
        self._first_token_s: float | None = None  # measured, not yet reported
        self._settled = False

    def accept(self, hooks: StreamHooks) -> bool:
        """The opener accepted the stream: tell the observer. False if it was already announced."""
        if self.announced:
            return False
        self.announced = True
        self.hooks = hooks
        self.observer.stream_opened()
        return True

    def first_token_measured(self, first_s: float) -> None:
        """Report the first token soon: after the writer's wake-up (queued when its frame was
        appended), so the frame goes out first."""
        self._first_token_s = first_s
        asyncio.get_running_loop().call_soon(self.report_first_token)

    def report_first_token(self) -> None:
        """Report a measured first token, unless the stream is not announced yet (then ``accept``'s
        caller reports it)."""
        first_s = self._first_token_s
        if first_s is None or not self.announced:
            return
        self._first_token_s = None
        self.observer.first_token(first_s)
        self.hooks.first_token(round(first_s * 1000, 3))

    def ended(self, result: StreamResult, sink: FrameSink | None) -> None:
        """Upstream is over: the observer, then the sink (readers on other instances see the end),
        then the hooks."""
        self.observer.stream_closed(result)
        if sink is not None:
            sink.end(result.outcome)
        self.hooks.ended(result)

    def settle(self, result: StreamResult) -> None:
        """Tell the hooks once, when the final frame was written or can no longer be.

        A trace span ended at upstream completion would close before the client saw ``done``.
        """
        if self._settled:
            return
        self._settled = True
        # The last hook: dropping the hooks here also ends the session ↔ hooks reference cycle, so
        # the session is freed by reference counting once the registry forgets it.
        hooks, self.hooks = self.hooks, NoHooks()
        hooks.settled(result)


# ------------------------------------------------------------------- the wait for the first answer
class FirstAnswer:
    """The wait for the RAG service's first word: the response's go-ahead, a refusal, or a timeout.

    A new stream's HTTP status waits on the upstream's first message itself, not on the call's
    initial metadata (which took a round trip and an event-loop hop of its own). A refusal (a gRPC
    status before any frame) is kept here to be answered as an HTTP error instead of an error frame.

    The wait ends at the end of the stream or when released by the response of the new stream,
    which writes the first frames from the pump and releases it once the first token is out (see
    ``EventStreamResponse``); a frame alone does not end it.

    One pending wait at a time, ended by ``release`` or its timer. A timer (not ``asyncio.timeout``)
    bounds the wait: a timeout cancels the awaiting task, and a cancellation must never reach the
    pump's pending gRPC read (grpcio leaks native memory for every task cancelled while awaiting a
    streaming read; see ``UpstreamPump.abort``).
    """

    __slots__ = ("_future", "refused")

    def __init__(self) -> None:
        self._future: asyncio.Future[None] | None = None
        self.refused: BridgeError | None = None

    async def wait(self, wait_s: float) -> None:
        """Return once released or ``wait_s`` elapsed, whichever is first."""
        loop = asyncio.get_running_loop()
        future = self._future = loop.create_future()
        timer = loop.call_later(wait_s, _resolve, future)
        try:
            await future
        finally:
            timer.cancel()
            self._future = None

    def release(self) -> None:
        """End the pending wait now (nothing happens when none is pending)."""
        future = self._future
        if future is not None:
            _resolve(future)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


# ----------------------------------------------------------------------------------- back-pressure
class Room:
    """Back-pressure for one stream's pump: whether it may append another frame, and the wait until
    it may (while the reader is a full window behind).

    Why this bounds memory: a reader that stops reading stops the pump, so the gRPC receive window
    fills and the RAG server pauses, instead of the bridge buffering the whole answer. Without a
    reader (a detached session in its grace window) the frame log's caps bound what is held: frames
    the shared resume store already holds are dropped here (a reader on another instance takes them
    from the store), else the stream expires rather than grow.

    ``Room`` holds the session's frame log and lifecycle, never the session itself, so it adds no
    reference cycle.
    """

    __slots__ = ("_freed", "_lifecycle", "_log", "_window_frames")

    def __init__(self, log: FrameLog, lifecycle: Lifecycle, window_frames: int) -> None:
        self._log = log
        self._lifecycle = lifecycle
        self._window_frames = window_frames
        self._freed = asyncio.Event()

    def needed(self) -> bool:
        """True when the pump must call ``make`` before reading on (checked synchronously per message)."""
        if self._lifecycle.attached:
            return self._log.lag >= self._window_frames
        return self._log.unsent_over_cap()

    async def make(self, sink: FrameSink | None) -> bool:
        """Wait while the attached reader is behind by a full window; False if the stream expired."""
        log, lifecycle = self._log, self._lifecycle
        while lifecycle.attached and log.lag >= self._window_frames:
            self._freed.clear()
            await self._freed.wait()
        if not lifecycle.attached and log.unsent_over_cap():
            if sink is not None and sink.healthy:
                # Frames flow to the store, where a reader elsewhere may be taking them: the local
                # cap is about memory, not about "nobody reads", so drop what the store holds.
                log.trim_stored(sink.flushed_seq)
                return True
            lifecycle.expired = True
            return False
        return True

    def freed(self) -> None:
        """The reader took frames, or left: a waiting pump re-checks."""
        self._freed.set()


# ---------------------------------------------------------- who reads the stream, and for how long
class LifecycleOwner(Protocol):
    @property
    def finished(self) -> bool: ...

    def remote_hold(self) -> Awaitable[float] | None:
        """Seconds a reader on another instance still holds the stream, when one might (else None)."""
        ...

    def expire(self) -> None:
        """Nobody came back within the grace window: cancel upstream."""
        ...


class Lifecycle:
    """Who reads a local stream, and how long it may run without a reader: attach/detach bookkeeping
    and the grace timer of one ``StreamSession``.

    States: attached (a reader takes frames) → detached (grace timer running, RESUME_GRACE_S) →
    attached again on a resume, or expired (the owner is told to cancel upstream). A newer reader
    supersedes an older one by bumping ``generation``; the older writer notices and stops without
    touching the session. ``left_at`` (when the last reader left) is what the session registry
    counts an ended stream's resume window from (bridge/stream/registry.py).

    The owner is passed to ``start_grace`` (and held by the timer only while it runs), never
    stored: a session ↔ lifecycle reference cycle would leave every ended session to the cyclic
    garbage collector, and the bridge's RSS would climb with every cancelled stream between
    collections (tests/e2e/test_memory_cancel.py).
    """

    __slots__ = ("_grace", "_hold_check", "attached", "expired", "generation", "grace_s", "left_at")

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.attached = True  # the first reader attaches right after the call opens
        self.generation = 0
        self.expired = False
        self.left_at: float | None = None  # time.monotonic() when the last reader left; None while one reads
        self._grace: asyncio.TimerHandle | None = None
        self._hold_check: asyncio.Task[None] | None = None

    def attach(self) -> int:
        """A reader takes the stream; returns its generation."""
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        self.attached = True
        self.left_at = None
        self.generation += 1
        return self.generation

    def detach(self, generation: int) -> bool:
        """The reader of ``generation`` left; True only the first time (detaching is idempotent:
        the disconnect watcher and the response's cleanup both call it, and a second grace timer
        would outlive a resume that cancelled the first)."""
        if generation != self.generation or not self.attached:
            return False
        self._left()
        return True

    def release(self, generation: int) -> bool:
        """The reader of ``generation`` wrote the final frame and closed normally."""
        if generation != self.generation:
            return False
        self._left()
        return True

    def _left(self) -> None:
        self.attached = False
        self.left_at = time.monotonic()

    def start_grace(self, owner: LifecycleOwner) -> None:
        self._grace = asyncio.get_running_loop().call_later(self.grace_s, self._expire, owner)

    def _expire(self, owner: LifecycleOwner) -> None:
        self._grace = None
        if self.attached:
            return
        hold = None if owner.finished else owner.remote_hold()
        if hold is not None:
            # A reader on another instance may be draining the store: ask before cancelling.
            self._hold_check = asyncio.get_running_loop().create_task(self._expire_unless_held(owner, hold))
            return
        self.expired = True
        owner.expire()

    async def _expire_unless_held(self, owner: LifecycleOwner, hold: Awaitable[float]) -> None:
        """Re-arm the grace timer for as long as a remote reader keeps its reader key alive.

        Without this, instance A would cancel upstream at its grace expiry while instance B is
        still streaming the answer to the reconnected client, cutting that answer short.
        """
        seconds = await hold
        self._hold_check = None
        if self.attached or self._grace is not None or owner.finished:
            return
        if seconds > 0:
            self._grace = asyncio.get_running_loop().call_later(seconds, self._expire, owner)
            return
        self.expired = True
        owner.expire()


# ------------------------------------------------------------------------------------ token timing
# Inter-token gaps go to the observers this many at a time (and at the end of the stream).
GAP_BATCH = 64


class TokenClock:
    """Token timing of one stream: counts tokens and measures them against the stream's start
    (monotonic seconds), time to first token and inter-token gaps, fed to the observers."""

    __slots__ = ("_gaps", "_last_at", "first_at", "observer", "started", "tokens")

    def __init__(self, observer: StreamObserver, started: float | None = None) -> None:
        self.observer = observer
        self.started = time.monotonic() if started is None else started
        self.first_at: float | None = None
        self._last_at = 0.0
        self._gaps: list[float] = []
        self.tokens = 0

    def token(self) -> float | None:
        """Count one token; on the first, return its latency in seconds (else None).

        The first token is not reported here: the session reports it once its frame is on the
        way (observers and the span are bookkeeping, not part of the path to the first byte).
        """
        now = time.monotonic()
        self.tokens += 1
        if self.first_at is None:
            self.first_at = self._last_at = now
            return now - self.started
        gaps = self._gaps
        gaps.append(now - self._last_at)
        self._last_at = now
        if len(gaps) >= GAP_BATCH:
            self.flush()
        return None

    def flush(self) -> None:
        """Hand the gaps collected so far to the observers in one call, so no observer runs once per token."""
        if self._gaps:
            self.observer.token_gaps(self._gaps)
            self._gaps = []

    @property
    def first_token_ms(self) -> float | None:
        return None if self.first_at is None else round((self.first_at - self.started) * 1000, 3)

    def elapsed_ms(self) -> float:
        return round((time.monotonic() - self.started) * 1000, 3)

    def result(
        self,
        stream_id: str,
        request_id: str,
        outcome: Outcome,
        error: BridgeError | None,
        finish_reason: str | None,
        trace_id: str | None,
    ) -> StreamResult:
        """The ended stream's figures, as the observers, hooks and the ``done`` frame report them."""
        error_code = None if error is None else error.code
        return StreamResult(
            stream_id,
            request_id,
            outcome,
            self.tokens,
            self.elapsed_ms(),
            self.first_token_ms,
            error_code,
            finish_reason,
            trace_id,
        )
