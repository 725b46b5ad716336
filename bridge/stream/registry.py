"""The streams this bridge instance serves: the sessions it owns, by stream id, for resume,
explicit stop and drain; and the readers it serves from the shared resume store, for drain.

Bounded by the stream caps: a session is added only after its slot was granted, and forgotten
once it settled and its resume window passed: RESUME_GRACE_S after its last reader left, and
never later than ``ENDED_HOLD_WINDOWS`` windows after it settled. A reader of the store is held
weakly, by its response, only while that response exists.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from typing import Protocol

from bridge.errors import BridgeError
from bridge.stream.session import StreamSession
from bridge.stream.source import ENDED_HOLD_WINDOWS


class StoreReader(Protocol):
    """A reader this instance serves from the resume store (``bridge.resume.remote.RemoteStream``)."""

    @property
    def running(self) -> bool:
        """A client is attached and the reader has not ended."""
        ...

    async def wait_closed(self) -> None:
        """Return once the reader stopped (its client left, or it wrote its final frame)."""
        ...

    def shut_down(self, error: BridgeError) -> None:
        """End the reader now with ``error`` as its final frame."""
        ...


class SessionRegistry:
    def __init__(self) -> None:
        self._sessions: dict[str, StreamSession] = {}
        self._readers: weakref.WeakSet[StoreReader] = weakref.WeakSet()
        self._refusing: BridgeError | None = None  # see refuse_reconnects

    def __len__(self) -> int:
        return len(self._sessions)

    def add(self, session: StreamSession) -> None:
        self._sessions[session.stream_id] = session
        if self._refusing is not None:
            session.refuse_reconnects(self._refusing)

    def get(self, stream_id: str) -> StreamSession | None:
        return self._sessions.get(stream_id)

    def discard(self, session: StreamSession) -> None:
        if self._sessions.get(session.stream_id) is session:
            del self._sessions[session.stream_id]

    def discard_after(self, session: StreamSession, delay_s: float) -> None:
        """Forget the settled ``session`` once no reader has come back for ``delay_s``.

        The window restarts whenever a reader leaves: counted once from the settle, a client
        that reconnects, catches up and is cut again (RESUME_GRACE_S after each cut to come back)
        would find the ended stream forgotten on its next reconnect, STREAM_EXPIRED instead of
        the rest of a completed answer.
        """
        if delay_s <= 0:
            self.discard(session)
            return
        latest = time.monotonic() + delay_s * ENDED_HOLD_WINDOWS
        asyncio.get_running_loop().call_later(delay_s, self._discard_if_idle, session, delay_s, latest)

    def _discard_if_idle(self, session: StreamSession, window_s: float, latest: float) -> None:
        now = time.monotonic()
        due = forget_at(left_at=session.reader_left_at, now=now, window_s=window_s, latest=latest)
        if due > now:
            asyncio.get_running_loop().call_later(due - now, self._discard_if_idle, session, window_s, latest)
        else:
            self.discard(session)

    def cancel(self, stream_id: str) -> bool:
        """Explicit stop (local, or published by another instance); False when not held here."""
        session = self._sessions.get(stream_id)
        if session is None:
            return False
        session.stop()
        return True

    def serve_from_store(self, reader: StoreReader) -> None:
        """Count ``reader`` among the streams a drain ends (held weakly: by its response)."""
        self._readers.add(reader)

    def refuse_reconnects(self, error: BridgeError) -> None:
        """This instance takes no reconnect any more (it drains: its listener is closed).

        Every session no client can read now (detached, no resume store to reach it from another
        instance) is ended with ``error``, and so is every one that becomes unreadable later (its
        reader leaves), sessions still being opened included: running on for the shutdown grace,
        such a stream would only keep the upstream generating for nobody.
        """
        self._refusing = error
        for session in list(self._sessions.values()):
            session.refuse_reconnects(error)

    def abort_all(self, error: BridgeError) -> int:
        """End every running stream with ``error`` as its final frame (used when draining): the
        sessions this instance owns, attached or not, and the readers it serves from the store.
        Returns how many it ended."""
        running = [s for s in self._sessions.values() if not s.finished]
        for session in running:
            session.abort(error)
        readers = [r for r in self._readers if r.running]
        for reader in readers:
            reader.shut_down(error)
        return len(running) + len(readers)

    async def wait_ended(self, timeout: float) -> bool:
        """Wait until no stream runs here any more, at most ``timeout``; True when none does.

        Covers every owned session, attached or detached (a detached one runs on for its resume
        window, and a client may be reading it on another instance), and every reader served from
        the store; streams that start meanwhile are waited for too. An owned session counts as
        ended once its pump has ended, which is when its end is reported to the hooks (and the
        audit trail).
        """
        deadline = time.monotonic() + timeout
        while True:
            sessions = [s for s in self._sessions.values() if s.result is None]
            readers = [r for r in self._readers if r.running]
            if not sessions and not readers:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            waits = [asyncio.ensure_future(s.wait_closed()) for s in sessions]
            waits += [asyncio.ensure_future(r.wait_closed()) for r in readers]
            try:
                await asyncio.wait(waits, timeout=left)
            finally:
                for wait in waits:  # only the waits: a pump is shielded from its waiters
                    wait.cancel()


def forget_at(*, left_at: float | None, now: float, window_s: float, latest: float) -> float:
    """When a settled session may be forgotten: ``window_s`` after its last reader left (a reader
    still attached counts as leaving now), and no later than ``latest``."""
    since = now if left_at is None else left_at
    return min(since + window_s, latest)
