"""Settings for stream sessions that tests drive directly, without HTTP."""

from __future__ import annotations

from bridge.stream.source import StreamPolicy

# No resume window, so abort() (or stop()) is the only way such a session ends early.
NO_RESUME = StreamPolicy(
    heartbeat_interval_s=30,
    send_timeout_s=30,
    resume_grace_s=0,
    window_frames=64,
    buffer_frames=100,
    buffer_bytes=1 << 20,
)
