"""The wait for the RAG service's first word: its first frame (or first token), a refusal, a timeout.

A new stream's HTTP status waits on the upstream's first message itself, not on the call's
initial metadata (which took a round trip and an event-loop hop of its own). A refusal (a gRPC
status before any frame) is kept here to be answered as an HTTP error instead of an error frame.

Two kinds of wait: ``on_frame`` returns at the first frame appended; without it only the end of
the stream, or ``release`` by whoever writes the first frames (the response of a new stream:
bridge/stream/response.py), ends the wait. The second kind is what keeps the request task asleep
between the first message and the first token, see ``EventStreamResponse``.

A timer (not ``asyncio.timeout``) bounds the wait: a timeout cancels the awaiting task, and a
cancellation must never reach the pump's pending gRPC read (grpcio leaks native memory for every
task cancelled while awaiting a streaming read; see ``UpstreamPump.abort``).
"""

from __future__ import annotations

import asyncio

from bridge.errors import BridgeError


class FirstAnswer:
    """One pending wait at a time, woken by frames (``on_frame`` waits), the end, or ``release``."""

    __slots__ = ("_future", "_on_frame", "refused")

    def __init__(self) -> None:
        self._future: asyncio.Future[None] | None = None
        self._on_frame = True
        self.refused: BridgeError | None = None

    async def wait(self, wait_s: float, *, on_frame: bool = True) -> None:
        """Return once woken (see the module docstring) or ``wait_s`` elapsed, whichever is first."""
        loop = asyncio.get_running_loop()
        future = self._future = loop.create_future()
        self._on_frame = on_frame
        timer = loop.call_later(wait_s, _resolve, future)
        try:
            await future
        finally:
            timer.cancel()
            self._future = None

    def frame_added(self) -> None:
        if self._on_frame:
            self.release()

    def release(self) -> None:
        """End the pending wait now, whatever its kind (the stream ended, or its writer says so)."""
        future = self._future
        if future is not None:
            _resolve(future)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
