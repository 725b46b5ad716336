"""The two interfaces around a session, what a response drains and where frames are mirrored, and
the policy they share.

``FrameSource`` is implemented by the local ``StreamSession`` and by the resume store's
``RemoteStream``, so one response writer serves both. ``FrameSink`` is implemented by the resume
store's ``FrameMirror``.

``StreamPolicy``, the per-stream limits and timings both sides obey, is built once from Settings
(bridge.state) and read by the local session, its registry and the resume store alike.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

from bridge.errors import BridgeError
from bridge.types import Outcome


class Notifier:
    """A level-triggered wake-up: one future per wait, no timer.

    The writer waits here between frames; heartbeats and the send timeout come from one periodic
    timer per stream instead of a timeout around every wait (an ``asyncio.timeout()`` per wait
    costs a visible share of a core at full token throughput).
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


class FrameSource(Protocol):
    """What ``EventStreamResponse`` drains: a local ``StreamSession`` or a reader of the store."""

    @property
    def stream_id(self) -> str: ...

    @property
    def request_id(self) -> str: ...

    @property
    def policy(self) -> StreamPolicy: ...

    @property
    def generation(self) -> int: ...

    @property
    def finished(self) -> bool: ...

    @property
    def sent_seq(self) -> int: ...

    def attach(self, after_seq: int) -> int | BridgeError:
        """Take the stream from ``after_seq``: the reader's generation, or why it cannot resume."""
        ...

    def detach(self, generation: int) -> None: ...

    def release(self, generation: int) -> None: ...

    def take(self) -> tuple[bytes, int]: ...

    def acknowledge(self, seq: int, generation: int) -> None: ...

    async def changed(self) -> None:
        """Wait until a frame is appended, the source finishes, or ``wake`` is called."""
        ...

    def wake(self) -> None: ...


class FrameSink(Protocol):
    """Where a session mirrors its frames for readers on other instances (bridge.resume.mirror).

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

    def reader_attached(self) -> None:
        """A reader here takes the stream: once it ended, the stored frames are held meanwhile."""
        ...

    def reader_left(self) -> None:
        """This instance's reader left: once the stream ended, hold the stored frames a resume
        window from now (bounded; never awaited); before that, only note that nobody reads here."""
        ...

    async def reader_hold_s(self) -> float:
        """Seconds a reader elsewhere still holds the stream (0: nobody; also 0 on any error)."""
        ...


# --------------------------------------------------------------------------- the per-stream policy
# An ended stream is held at the latest this many resume windows after it ended, however often its
# client comes back: each reconnect re-opens the window (here: ``SessionRegistry.discard_after``; in
# the shared resume store: ``ResumeStore.hold_ended``), and without a ceiling a client reconnecting
# with an old Last-Event-ID every few seconds would keep an ended stream's replay buffer (up to
# RESUME_BUFFER_BYTES), or its Redis keys, for ever, one per stream it ever opened.
ENDED_HOLD_WINDOWS = 4


@dataclass(frozen=True, slots=True)
class StreamPolicy:
    heartbeat_interval_s: float  # HEARTBEAT_INTERVAL_S: a comment-free ``heartbeat`` event in silences
    send_timeout_s: float  # SEND_TIMEOUT_S: a reader that takes no bytes this long is dropped
    resume_grace_s: float  # RESUME_GRACE_S: how long a detached stream waits for a reconnect
    window_frames: int  # STREAM_WINDOW_FRAMES: unsent frames before the pump waits (back-pressure)
    buffer_frames: int  # RESUME_BUFFER_FRAMES: frames kept for resume
    buffer_bytes: int  # RESUME_BUFFER_BYTES: bytes kept for resume
