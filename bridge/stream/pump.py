"""The upstream pump: reads the gRPC stream, hands each message to its target, waits for room.

One task per stream. It awaits only the next message and, when the reader falls a window behind,
room (back-pressure: the gRPC receive window then fills and the RAG server pauses). Whatever
happens, it ends by calling ``PumpTarget.pump_ended`` exactly once, so every session gets its
final frame or its cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import grpc

from bridge.errors import BridgeError, from_grpc_status
from bridge.types import Outcome
from bridge.upstream import ChatStream

log = logging.getLogger("bridge.stream")


class PumpTarget(Protocol):
    """What the pump feeds (the local ``StreamSession``)."""

    stream_id: str

    @property
    def token_sent(self) -> bool:
        """A token frame was produced (from then on a retry would show the client tokens twice)."""
        ...

    def on_message(self, message: Any) -> str | None:
        """Turn one message into frames; the finish reason once the answer is complete."""
        ...

    def needs_room(self) -> bool: ...

    @property
    def handover(self) -> Callable[[], Awaitable[None]] | None:
        """Set while a new stream opens: the pump awaits it after each frame it appends (the
        response writes the frame in the turn its message arrived)."""
        ...

    async def make_room(self) -> bool:
        """Wait until the reader caught up; False when nobody reads and the buffer is full."""
        ...

    def pump_ended(self, outcome: Outcome, error: BridgeError | None, finish_reason: str | None) -> None: ...


class UpstreamPump:
    """Moves one ``ChatStream`` into a ``PumpTarget``; ``abort`` stops it from outside."""

    __slots__ = ("_abort_error", "_abort_pending", "_call", "_pumping", "_reading", "_stopped", "_target", "_task")

    def __init__(self, call: ChatStream, target: PumpTarget) -> None:
        self._call: ChatStream | None = call
        self._target: PumpTarget | None = target
        self._task: asyncio.Task[None] | None = None
        self._pumping = False  # the task has run its first step
        self._reading = False  # the task is suspended in ``call.read()``
        self._abort_pending = False  # abort() was called: the pump ends as if cancelled
        self._abort_error: BridgeError | None = None
        self._stopped = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The pump's task (tests check that ``abort`` never cancels it mid-read)."""
        return self._task

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def abort(self, error: BridgeError | None = None, *, stopped: bool = False) -> None:
        """Stop the call now; with ``error`` the reader gets it as the final frame.

        ``stopped``: an explicit stop (DELETE), whose outcome stays "cancelled" although it sends
        an error frame.

        Invariant: a task suspended in ``call.read()`` is never cancelled; the *call* is, and the
        pending read then ends with CANCELLED by itself (handled like a task cancellation).
        Cancelling the awaiting task as well leaks native memory in grpcio: the cancelled awaiter
        of ``execute_batch`` drops its ``grpc_op`` array, never freed, once per cancelled stream
        (grpc/grpc#43360). Only a pump waiting for room (no gRPC op pending) is cancelled as
        a task.
        """
        self._abort_error = error
        self._stopped = self._stopped or stopped
        if not self.running:
            return
        assert self._task is not None
        self._abort_pending = True
        if self._call is not None:
            # Cancel upstream now, not when the pump task next runs: under load that is several
            # event-loop turns later, and the RAG server keeps generating for a client that left.
            self._call.cancel()
        if not self._pumping or self._reading:
            # Not started: cancelling a task before its first step skips the coroutine body,
            # ``finally`` and all (no final frame, no end hooks: the stream slot would leak), so
            # the pump checks ``_abort_pending`` when it starts. Reading: see the invariant above.
            return
        self._task.cancel()

    async def wait_closed(self) -> None:
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._task)

    async def _run(self) -> None:
        call, target = self._call, self._target
        assert call is not None and target is not None
        outcome: Outcome = "error"
        error: BridgeError | None = None
        finish_reason: str | None = None
        self._pumping = True
        try:
            if self._abort_pending:
                raise asyncio.CancelledError
            while finish_reason is None:
                self._reading = True
                try:
                    message = await call.read()
                except grpc.aio.AioRpcError as exc:
                    if self._abort_pending:  # the status raced abort(): the stream ended here
                        raise asyncio.CancelledError from None
                    if call.reopen_after(exc, token_sent=target.token_sent):
                        continue  # Upstream's retry rule allowed a new call
                    raise
                finally:
                    self._reading = False
                if self._abort_pending:
                    # abort() cancelled the call while this read was already answered: the
                    # message is dropped, as a cancelled task would have dropped it.
                    raise asyncio.CancelledError
                if message is grpc.aio.EOF:
                    error = BridgeError(
                        "the RAG service ended the stream without completing it",
                        code="UPSTREAM_PROTOCOL",
                        retryable=True,
                    )
                    break
                finish_reason = target.on_message(message)
                handover = target.handover
                if handover is not None:
                    await handover()
                if finish_reason is None and target.needs_room() and not await target.make_room():
                    raise asyncio.CancelledError  # nobody is reading and the replay buffer is full
            if finish_reason is not None:
                outcome = "completed"
        except grpc.aio.AioRpcError as exc:
            error = from_grpc_status(exc.code(), exc.details(), call.request_id)
        except asyncio.CancelledError:
            outcome = "cancelled"
            error = self._abort_error
            if error is not None and not self._stopped:
                outcome = "error"
        except Exception:  # pragma: no cover - a bug must still end the stream with a frame
            log.exception("stream %s failed", target.stream_id)
            error = BridgeError("internal error in the bridge", code="INTERNAL", retryable=True)
        finally:
            if outcome != "completed":
                # A completed call ends with the server's OK status; cancelling it here would turn
                # every finished stream into a CANCELLED client span.
                call.cancel()
            # A finished call holds grpc state the session would otherwise keep for its whole resume
            # window, multiplied by every ended stream still resumable.
            self._call = None
            # Nor the target: session → pump → session would leave every ended session to the
            # cyclic garbage collector, and RSS would climb with every cancelled stream between
            # collections.
            self._target = None
            target.pump_ended(outcome, error, finish_reason)
        if outcome == "completed":
            # The answer is complete and its final frame is out; the server's status (trailers)
            # may still be in flight. The task lives until it arrives (bounded by the call's
            # deadline), so whoever waits for the pump, such as the trace span of the stream,
            # ends after the gRPC call did: a span ended at the final frame would close before its
            # own client span, and the trace would show the child outliving its parent.
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await call.closed()
