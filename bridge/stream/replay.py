"""The replay log: a stream's encoded frames, unsent and (for resume) sent, with byte caps, and
whether a reconnect carrying ``Last-Event-ID`` can be served from it.

Pure bookkeeping, no I/O and no event loop, so it is unit-tested in-process
(tests/unit/stream/test_replay.py). Used by the local session (frames the pump produced) and by the remote
reader of the shared resume store (frames read from Redis): one implementation of "move frames
from unsent to sent" instead of one per source.

Invariants, each preventing a known failure:
- frames leave in seq order, and a frame is in ``unsent`` or in ``sent``, never both, so a
  resumed reader gets every frame after its id exactly once;
- ``sent`` is trimmed to ``max_frames`` / ``max_bytes`` on every acknowledgement, so a long
  answer read by a live client does not keep the whole answer in memory;
- ``trimmed_through`` remembers frames dropped unread because the resume store holds them, so a
  resume from before that point is sent to the store instead of getting a gap.

The resume decisions (``plan_resume``, ``refusal``) are pure functions over a session's
``FrameLog``, so the rules read in one place:

- a stream that expired or was cancelled is never resumed (its upstream call is gone, so a
  "resumed" reader would wait for frames that never come);
- an id the bridge never sent, or whose following frames are gone, is refused with
  ``StreamExpired`` (never silently replayed from a later point: the client would miss text);
- frames trimmed here only because the shared resume store holds them are served from the store,
  so a detached session's local memory can stay bounded without losing a reader elsewhere.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterator

from bridge.errors import StreamExpired

# Frames ready together are written in one send, up to this many bytes (write coalescing).
COALESCE_BYTES = 64 * 1024

Frame = tuple[int, bytes]


def coalesce(frames: deque[Frame], total_bytes: int, sent_seq: int) -> tuple[bytes, int]:
    """Queued frames joined for one write (at most ``COALESCE_BYTES`` unless one frame is larger), and the
    last seq included; ``(b"", sent_seq)`` when nothing is queued."""
    if not frames:
        return b"", sent_seq
    if len(frames) == 1 or total_bytes <= COALESCE_BYTES:
        return b"".join(data for _, data in frames), frames[-1][0]
    parts: list[bytes] = []
    size = 0
    last = sent_seq
    for seq, data in frames:
        if parts and size + len(data) > COALESCE_BYTES:
            break
        parts.append(data)
        size += len(data)
        last = seq
    return b"".join(parts), last


class Replay(enum.Enum):
    """Whether a reader resuming after some seq can be served from this log."""

    READY = "ready"
    NEVER_SENT = "never_sent"  # the id is ahead of anything this stream produced
    TRIMMED = "trimmed"  # dropped here unread because the resume store holds them
    GONE = "gone"  # dropped from the replay window: nobody holds them any more


class FrameLog:
    """Frames by seq: ``unsent`` waits for the writer, ``sent`` is kept for a reconnect."""

    __slots__ = (
        "_sent",
        "_sent_bytes",
        "_unsent",
        "_unsent_bytes",
        "keep_sent",
        "last_seq",
        "max_bytes",
        "max_frames",
        "sent_seq",
        "trimmed_through",
    )

    def __init__(self, *, keep_sent: bool, max_frames: int, max_bytes: int) -> None:
        self.keep_sent = keep_sent  # False: no resume window, a written frame is forgotten at once
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self._unsent: deque[Frame] = deque()
        self._unsent_bytes = 0
        self._sent: deque[Frame] = deque()
        self._sent_bytes = 0
        self.last_seq = 0  # the newest frame appended
        self.sent_seq = 0  # the newest frame the current reader has taken
        self.trimmed_through = 0

    @property
    def has_unsent(self) -> bool:
        return bool(self._unsent)

    @property
    def unsent_frames(self) -> int:
        return len(self._unsent)

    @property
    def held_bytes(self) -> int:
        return self._unsent_bytes + self._sent_bytes

    @property
    def lag(self) -> int:
        """Frames produced but not yet taken by the reader (the back-pressure measure)."""
        return self.last_seq - self.sent_seq

    def unsent_over_cap(self) -> bool:
        return len(self._unsent) > self.max_frames or self._unsent_bytes > self.max_bytes

    def append(self, data: bytes, seq: int | None = None) -> int:
        """Queue a frame; its seq is the next one unless given (a remote reader's frames keep
        the seq they were stored with). Returns the seq."""
        if seq is None:
            seq = self.last_seq + 1
        self.last_seq = max(self.last_seq, seq)
        self._unsent.append((seq, data))
        self._unsent_bytes += len(data)
        return seq

    def unsent(self) -> Iterator[Frame]:
        """The frames no reader has taken yet, oldest first."""
        return iter(self._unsent)

    def held(self) -> Iterator[Frame]:
        """Every frame held, sent (kept for resume) then unsent, oldest first."""
        yield from self._sent
        yield from self._unsent

    def keep_sent_frames(self, keep: bool) -> None:
        """Keep written frames (for resume, or for a sink attached later) or forget them now."""
        self.keep_sent = keep
        if not keep:
            self._sent.clear()
            self._sent_bytes = 0

    def take(self) -> tuple[bytes, int]:
        """Unsent frames joined for one write, and the last seq included (nothing is moved)."""
        return coalesce(self._unsent, self._unsent_bytes, self.sent_seq)

    def acknowledge(self, seq: int) -> None:
        """Frames up to ``seq`` reached the socket: keep them for resume (within the caps)."""
        self._mark_sent(seq)
        while self._sent and (len(self._sent) > self.max_frames or self._sent_bytes > self.max_bytes):
            self._sent_bytes -= len(self._sent.popleft()[1])
        self.sent_seq = seq

    def rewind(self, after_seq: int) -> None:
        """A reader resumes after ``after_seq``: what it missed is unsent again, what it already
        has (perhaps from another instance) is not sent twice."""
        while self._sent and self._sent[-1][0] > after_seq:
            seq, data = self._sent.pop()
            self._sent_bytes -= len(data)
            self._unsent.appendleft((seq, data))
            self._unsent_bytes += len(data)
        self._mark_sent(after_seq)
        self.sent_seq = after_seq

    def replay(self, after_seq: int) -> Replay:
        """Can every frame after ``after_seq`` still be sent from here?"""
        if after_seq > self.last_seq:
            return Replay.NEVER_SENT
        if after_seq < self.trimmed_through:
            return Replay.TRIMMED
        if after_seq < self.sent_seq and not (self._sent and self._sent[0][0] <= after_seq + 1):
            return Replay.GONE
        return Replay.READY

    def trim_stored(self, stored_seq: int) -> None:
        """Nobody reads here and the resume store holds every frame up to ``stored_seq``: drop
        the sent frames and the oldest unsent ones it holds, down to the cap."""
        while self._sent:
            seq, data = self._sent.popleft()
            self._sent_bytes -= len(data)
            self.trimmed_through = max(self.trimmed_through, seq)
        while self._unsent and self._unsent[0][0] <= stored_seq and self.unsent_over_cap():
            seq, data = self._unsent.popleft()
            self._unsent_bytes -= len(data)
            self.trimmed_through = seq

    def _mark_sent(self, seq: int) -> None:
        while self._unsent and self._unsent[0][0] <= seq:
            item = self._unsent.popleft()
            self._unsent_bytes -= len(item[1])
            if self.keep_sent:
                self._sent.append(item)
                self._sent_bytes += len(item[1])


# ---------------------------------------------------------------------------- the resume decisions
class Resume(enum.Enum):
    """How a reconnect to a local session can be served."""

    HERE = "here"  # every frame after the id is held here
    FROM_STORE = "from_store"  # dropped here once mirrored: the shared resume store holds them
    NOTHING_LEFT = "nothing_left"  # the client already has the final frame


_REFUSALS = {
    Replay.NEVER_SENT: "this event id was never sent",
    Replay.TRIMMED: "the frames after this event id are no longer held here",
    Replay.GONE: "the frames after this event id are no longer held",
}


def refusal(log: FrameLog, after_seq: int, *, over: bool) -> StreamExpired | None:
    """Why a reader may not take the stream after ``after_seq``; None when it may.

    ``over``: the stream expired or was cancelled.
    """
    if over:
        return StreamExpired("the stream expired before it was resumed", retryable=False)
    why = _REFUSALS.get(log.replay(after_seq))
    return None if why is None else StreamExpired(why, retryable=False)


def plan_resume(log: FrameLog, after_seq: int, *, over: bool, finished: bool) -> Resume | StreamExpired:
    """Can a reconnect after ``after_seq`` be served, and from where?"""
    if log.replay(after_seq) is Replay.TRIMMED and not over:
        return Resume.FROM_STORE
    refused = refusal(log, after_seq, over=over)
    if refused is not None:
        return refused
    if finished and log.sent_seq >= log.last_seq == after_seq:
        return Resume.NOTHING_LEFT
    return Resume.HERE
