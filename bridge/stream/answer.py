"""The wait for the RAG service's first word: the response's go-ahead, a refusal, or a timeout.

A new stream's HTTP status waits on the upstream's first message itself, not on the call's
initial metadata (which took a round trip and an event-loop hop of its own). A refusal (a gRPC
status before any frame) is kept here to be answered as an HTTP error instead of an error frame.

The wait ends at the end of the stream or when released by the response of the new stream, which
writes the first frames from the pump and releases it once the first token is out (see
``EventStreamResponse``); a frame alone does not end it.

A timer (not ``asyncio.timeout``) bounds the wait: a timeout cancels the awaiting task, and a
cancellation must never reach the pump's pending gRPC read (grpcio leaks native memory for every
task cancelled while awaiting a streaming read; see ``UpstreamPump.abort``).
"""

from __future__ import annotations

import asyncio

from bridge.errors import BridgeError


class FirstAnswer:
    """One pending wait at a time, ended by ``release`` or its timer."""

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
