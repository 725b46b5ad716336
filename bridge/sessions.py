"""The streams this bridge instance owns, by stream id, for resume, explicit stop and drain."""

from __future__ import annotations

import asyncio

from bridge.errors import BridgeError
from bridge.streaming import StreamSession


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
