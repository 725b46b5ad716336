"""Whether a reconnect carrying ``Last-Event-ID`` can be served by a local session, and from where.

Pure decisions over the session's ``FrameLog``, kept apart so the rules read in one place:

- a stream that expired or was cancelled is never resumed (its upstream call is gone, so a
  "resumed" reader would wait for frames that never come);
- an id the bridge never sent, or whose following frames are gone, is refused with
  ``StreamExpired`` (never silently replayed from a later point: the client would miss text);
- frames trimmed here only because the shared resume store holds them are served from the store,
  so a detached session's local memory can stay bounded without losing a reader elsewhere.
"""

from __future__ import annotations

import enum

from bridge.errors import StreamExpired
from bridge.stream.framelog import FrameLog, Replay


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
