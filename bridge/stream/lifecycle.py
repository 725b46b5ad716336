"""Who reads a local stream, and how long it may run without a reader.

States: attached (a reader takes frames) → detached (grace timer running, RESUME_GRACE_S) →
attached again on a resume, or expired (the owner is told to cancel upstream). A newer reader
supersedes an older one by bumping ``generation``; the older writer notices and stops without
touching the session. ``left_at`` (when the last reader left) is what the session registry counts
an ended stream's resume window from (bridge/stream/registry.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Protocol


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
    """Attach/detach bookkeeping and the grace timer of one ``StreamSession``.

    The owner is passed to ``start_grace`` (and held by the timer only while it runs), never
    stored: a session ↔ lifecycle reference cycle would leave every ended session to the cyclic
    garbage collector, and the bridge's RSS then climbed by ~0.2 KiB per cancelled stream between
    collections (tests/test_memory_cancel.py).
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
