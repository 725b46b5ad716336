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

The session coordinates; the rules live beside it: who hears of the stream and when (hooks.py),
the opener's wait for the first answer (answer.py), back-pressure (backpressure.py), the resume
rules (resumption.py), the gRPC read loop and its retry (pump.py), attach/detach/grace
(lifecycle.py). None holds a reference back to the session: a session ↔ part cycle would leave
every ended session to the cyclic garbage collector (tests/test_memory_streams.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from bridge.errors import BadRequest, BridgeError, StreamExpired, UpstreamError
from bridge.stream.answer import FirstAnswer
from bridge.stream.backpressure import Room
from bridge.stream.framelog import FrameLog
from bridge.stream.frames import FrameEncoder, StreamEncoder, finish_reason
from bridge.stream.hooks import Audience, NoHooks, StreamHooks
from bridge.stream.lifecycle import Lifecycle
from bridge.stream.policy import StreamPolicy
from bridge.stream.pump import UpstreamPump
from bridge.stream.resumption import Resume, plan_resume, refusal
from bridge.stream.source import FrameSink, Notifier
from bridge.stream.timing import TokenClock
from bridge.types import NullObserver, Outcome, StreamObserver, StreamResult
from bridge.upstream import ChatStream

__all__ = ["NoHooks", "Resume", "StreamHooks", "StreamSession"]


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
        None. See bridge/stream/answer.py for why the status waits on the first message.
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
        """Back-pressure (bridge/stream/backpressure.py): False once the stream expired instead."""
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
        """Can a reconnect after ``after_seq`` be served, and from where? (bridge/stream/resumption.py)"""
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
        stream ended held its keys for as long as that reader was attached, i.e. up to their
        ceiling (four windows) after an end nobody was reading.
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
