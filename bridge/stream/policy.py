"""The per-stream limits and timings, built once from Settings (bridge.state)."""

from __future__ import annotations

from dataclasses import dataclass

# An ended stream is held at the latest this many resume windows after it ended, however often its
# client comes back: each reconnect re-opens the window (here: ``SessionRegistry.discard_after``; in
# the shared resume store: ``ResumeStore.hold_ended``), and without a ceiling a client reconnecting
# with an old Last-Event-ID every few seconds would keep an ended stream's replay buffer (up to
# RESUME_BUFFER_BYTES), or its Redis keys, for ever, one per stream it ever opened.
ENDED_HOLD_WINDOWS = 4


@dataclass(frozen=True, slots=True)
class StreamPolicy:
    heartbeat_interval_s: float  # HEARTBEAT_INTERVAL_S: a comment-free ``heartbeat`` event in silences
    send_timeout_s: float  # SEND_TIMEOUT_S: a reader that takes no bytes this long is dropped
    resume_grace_s: float  # RESUME_GRACE_S: how long a detached stream waits for a reconnect
    window_frames: int  # STREAM_WINDOW_FRAMES: unsent frames before the pump waits (back-pressure)
    buffer_frames: int  # RESUME_BUFFER_FRAMES: frames kept for resume
    buffer_bytes: int  # RESUME_BUFFER_BYTES: bytes kept for resume
