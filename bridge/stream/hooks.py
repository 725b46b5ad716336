"""Who hears of one stream: its observer (metrics, logs) and the opener's hooks (span, audit, caps).

``Audience`` keeps the rules of telling them apart from the session's frame handling:

- while a stream is being opened nobody hears of it, so a call the RAG service refuses before
  answering leaves no trace but the refusal (no opened/closed pair in the metrics, no audit
  record); what happened meanwhile (the first token, the end) is told by ``accept``, in order;
- the first token is reported after its frame is on the way, never on the path to the socket;
- ``settled`` reaches the hooks exactly once, and dropping the hooks then ends the session ↔ hooks
  reference cycle, so an ended session is freed by reference counting, not left to the GC.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from bridge.stream.source import FrameSink
from bridge.types import StreamObserver, StreamResult


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
    """The observer and hooks of one stream; see the module docstring."""

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
