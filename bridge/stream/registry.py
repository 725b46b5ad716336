"""The streams this bridge instance owns, by stream id: for resume, explicit stop and drain.

Bounded by the stream caps: a session is added only after its slot was granted, and forgotten
once it settled and its resume window passed: RESUME_GRACE_S after its last reader left, and
never later than ``ENDED_HOLD_WINDOWS`` windows after it settled.
"""

from __future__ import annotations

import asyncio
import time

from bridge.errors import BridgeError
from bridge.stream.policy import ENDED_HOLD_WINDOWS
from bridge.stream.session import StreamSession


class SessionRegistry:
    def __init__(self) -> None:
        self._sessions: dict[str, StreamSession] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def add(self, session: StreamSession) -> None:
        self._sessions[session.stream_id] = session

    def get(self, stream_id: str) -> StreamSession | None:
        return self._sessions.get(stream_id)

    def discard(self, session: StreamSession) -> None:
        if self._sessions.get(session.stream_id) is session:
            del self._sessions[session.stream_id]

    def discard_after(self, session: StreamSession, delay_s: float) -> None:
        """Forget the settled ``session`` once no reader has come back for ``delay_s``.

        The window restarts whenever a reader leaves: counted once from the settle, a client
        that reconnected, caught up and cut again (RESUME_GRACE_S after each cut to come back)
        found the ended stream forgotten on its next reconnect, STREAM_EXPIRED instead of the
        rest of a completed answer (16 streams in the 30-minute soak).
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

    def abort_all(self, error: BridgeError) -> list[StreamSession]:
        """End every running stream with ``error`` as its final frame (used when draining)."""
        running = [s for s in self._sessions.values() if not s.finished]
        for session in running:
            session.abort(error)
        return running

    async def wait_all(self, timeout: float) -> None:
        sessions = list(self._sessions.values())
        if sessions:
            await asyncio.wait([asyncio.ensure_future(s.wait_closed()) for s in sessions], timeout=timeout)


def forget_at(*, left_at: float | None, now: float, window_s: float, latest: float) -> float:
    """When a settled session may be forgotten: ``window_s`` after its last reader left (a reader
    still attached counts as leaving now), and no later than ``latest``."""
    since = now if left_at is None else left_at
    return min(since + window_s, latest)
