"""Back-pressure for one stream's pump: it waits while the reader is a full window behind.

Why this bounds memory: a reader that stops reading stops the pump, so the gRPC receive window
fills and the RAG server pauses, instead of the bridge buffering the whole answer. Without a
reader (a detached session in its grace window) the frame log's caps bound what is held: frames
the shared resume store already holds are dropped here (a reader on another instance takes them
from the store), else the stream expires rather than grow.

``Room`` holds the session's frame log and lifecycle, never the session itself, so it adds no
reference cycle.
"""

from __future__ import annotations

import asyncio

from bridge.stream.framelog import FrameLog
from bridge.stream.lifecycle import Lifecycle
from bridge.stream.source import FrameSink


class Room:
    """Whether the pump may append another frame, and the wait until it may."""

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
