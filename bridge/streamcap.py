"""Caps on concurrent streams: per user (or IP) and in total.

A :class:`Lease` is the only way to give a slot back, and releasing it twice is a no-op. That
prevents the two ways a counter drifts: a slot leaked when a stream's cleanup path is skipped, and a
slot freed twice when the stream ends and its client disconnect handler also releases (which would
let a user exceed the cap, or drive a count negative).
"""

from __future__ import annotations

from typing import Protocol

from bridge.errors import ServiceUnavailable, TooManyRequests


class Caps(Protocol):
    """What the handlers use: in process memory (``StreamCaps``) or shared (bridge/sharedcaps.py)."""

    @property
    def open_total(self) -> int: ...

    async def take(self, key: str) -> Lease: ...

    async def aclose(self) -> None: ...


class Lease:
    """One open stream's slot; ``release()`` is idempotent."""

    __slots__ = ("_caps", "_released", "key")

    def __init__(self, caps: StreamCaps, key: str) -> None:
        self._caps = caps
        self.key = key
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        """Give the slot back; later calls do nothing."""
        self._caps._release(self)


class StreamCaps:
    """Counts open streams; ``acquire`` refuses over ``per_user`` (429) or ``total`` (503).

    The per-user check comes first so that a single greedy client hears "you have too many" rather
    than "we are overloaded". ``retry_after_s`` is the hint sent with either refusal.
    """

    def __init__(self, per_user: int, total: int, *, retry_after_s: float = 5.0) -> None:
        if per_user < 1 or total < 1:
            raise ValueError("stream caps must be >= 1")
        self.per_user = per_user
        self.total = total
        self.retry_after_s = retry_after_s
        self._by_key: dict[str, int] = {}
        self._open = 0  # no lock: only the event loop's thread touches the caps

    @property
    def open_total(self) -> int:
        return self._open

    def open_for(self, key: str) -> int:
        return self._by_key.get(key, 0)

    def acquire(self, key: str) -> Lease:
        """Take a slot for ``key`` or raise TooManyRequests / ServiceUnavailable."""
        mine = self._by_key.get(key, 0)
        if mine >= self.per_user:
            raise TooManyRequests(
                f"too many concurrent streams (limit {self.per_user})",
                code="TOO_MANY_STREAMS",
                retryable=True,
                retry_after_s=self.retry_after_s,
            )
        if self._open >= self.total:
            raise ServiceUnavailable(
                "the server is at its stream capacity, try again shortly",
                code="OVERLOADED",
                retryable=True,
                retry_after_s=self.retry_after_s,
            )
        self._by_key[key] = mine + 1
        self._open += 1
        return Lease(self, key)

    async def take(self, key: str) -> Lease:
        """``acquire`` behind the ``Caps`` interface (nothing to wait for in process memory)."""
        return self.acquire(key)

    async def aclose(self) -> None:
        """Nothing to release: the counts live in this process."""

    def _release(self, lease: Lease) -> None:
        if lease._released:
            return
        lease._released = True
        left = self._by_key[lease.key] - 1
        if left:
            self._by_key[lease.key] = left
        else:
            del self._by_key[lease.key]  # no entry per past user: the dict cannot grow forever
        self._open -= 1
