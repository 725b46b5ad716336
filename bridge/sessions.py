"""The streams this bridge instance owns, by stream id, for resume, explicit stop and drain.

The registry also owns the instance's ``ResumeStore`` (RESUME_STORE), created on first use: the
store's cancel subscriber matters only once this instance owns a stream, and the registry is
where an explicit stop published by another instance must land.
"""

from __future__ import annotations

import asyncio

from bridge.config import Settings
from bridge.errors import BridgeError
from bridge.resume_store import ResumeStore
from bridge.streaming import StreamPolicy, StreamSession


class SessionRegistry:
    def __init__(self) -> None:
        self._sessions: dict[str, StreamSession] = {}
        self._store: ResumeStore | None = None

    def __len__(self) -> int:
        return len(self._sessions)

    def add(self, session: StreamSession) -> None:
        self._sessions[session.stream_id] = session

    def get(self, stream_id: str) -> StreamSession | None:
        return self._sessions.get(stream_id)

    def discard(self, session: StreamSession) -> None:
        if self._sessions.get(session.stream_id) is session:
            del self._sessions[session.stream_id]

    def cancel(self, stream_id: str) -> bool:
        """Explicit stop (local, or published by another instance); False when not held here."""
        session = self._sessions.get(stream_id)
        if session is None:
            return False
        session.stop()
        return True

    def resume_store(self, settings: Settings, policy: StreamPolicy) -> ResumeStore | None:
        """The shared resume store, or None when RESUME_STORE is unset or there is no grace window.

        Created and started lazily inside the running loop (a redis.asyncio pool or task made
        elsewhere would be bound to another loop); returns the same store afterwards.
        """
        if self._store is None and settings.resume_store and settings.resume_grace_s > 0:
            self._store = ResumeStore(settings.resume_store, policy, on_cancel=self.cancel)
            self._store.start()
        return self._store

    @property
    def store(self) -> ResumeStore | None:
        return self._store

    async def aclose(self) -> None:
        """Release the resume store's connections and subscriber (app shutdown)."""
        if self._store is not None:
            store, self._store = self._store, None
            await store.aclose()

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
