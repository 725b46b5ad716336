"""The session's collaborators, in-process: resume rules (local and in the shared store's meta
record), audience, first-answer wait, back-pressure."""

from __future__ import annotations

import asyncio

from bridge.errors import StreamExpired
from bridge.resume.keys import LOST, StoredStream
from bridge.stream.registry import forget_at
from bridge.stream.replay import FrameLog, Resume, plan_resume, refusal
from bridge.stream.session import Audience, FirstAnswer, Lifecycle, NoHooks, Room
from bridge.types import NullObserver, StreamResult

RESULT = StreamResult("s", "r", "completed", 1, 1.0, 1.0)


def log_of(frames: int, *, sent: int = 0) -> FrameLog:
    log = FrameLog(keep_sent=True, max_frames=100, max_bytes=1 << 20)
    for seq in range(1, frames + 1):
        log.append(b"frame %d" % seq)
    log.acknowledge(sent)
    return log


def test_a_resume_inside_the_log_is_served_here() -> None:
    assert plan_resume(log_of(3, sent=3), 1, over=False, finished=False) is Resume.HERE


def test_a_resume_after_the_final_frame_has_nothing_left() -> None:
    assert plan_resume(log_of(3, sent=3), 3, over=False, finished=True) is Resume.NOTHING_LEFT


def test_an_id_never_sent_is_refused_not_replayed() -> None:
    refused = plan_resume(log_of(3, sent=3), 9, over=False, finished=False)
    assert isinstance(refused, StreamExpired) and "never sent" in refused.message


def test_an_expired_or_cancelled_stream_is_never_resumed() -> None:
    refused = refusal(log_of(3, sent=3), 1, over=True)
    assert isinstance(refused, StreamExpired) and refused.retryable is False
    assert refusal(log_of(3, sent=3), 1, over=False) is None


def stored(**fields: bytes) -> StoredStream:
    record = StoredStream.parse("s", {b"owner": b"o", **{k.encode(): v for k, v in fields.items()}})
    assert record is not None
    return record


def test_a_stored_stream_is_over_once_its_owner_stored_its_end_but_not_when_mirroring_was_lost() -> None:
    """A stop of a stream that is over needs no owner to hear it; a stream whose mirror gave up
    (``LOST``) may still run on its owner, so a stop must still reach the owner."""
    assert not stored().over
    assert not stored(last_seq=b"4").over
    assert all(stored(end=outcome.encode()).over for outcome in ("completed", "cancelled", "error"))
    assert not stored(end=LOST.encode()).over


class Recording(NoHooks):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def first_token(self, ms: float) -> None:
        self.calls.append("first_token")

    def ended(self, result: StreamResult) -> None:
        self.calls.append("ended")

    def settled(self, result: StreamResult) -> None:
        self.calls.append("settled")


def test_audience_settles_once_and_then_drops_its_hooks() -> None:
    hooks = Recording()
    audience = Audience(NullObserver())
    assert audience.accept(hooks) is True
    audience.settle(RESULT)
    audience.settle(RESULT)
    assert hooks.calls == ["settled"]
    assert isinstance(audience.hooks, NoHooks)  # the session ↔ hooks cycle ends here


async def test_a_stream_being_opened_reports_its_first_token_only_once_accepted() -> None:
    hooks = Recording()
    audience = Audience(NullObserver())
    audience.first_token_measured(0.01)
    await asyncio.sleep(0)  # let the scheduled report run: it must hold back
    assert audience.accept(hooks) is True
    audience.report_first_token()
    assert hooks.calls == ["first_token"]
    assert audience.accept(hooks) is False


async def test_the_first_answer_wait_ends_when_released() -> None:
    answer = FirstAnswer()
    waiting = asyncio.ensure_future(answer.wait(30.0))
    await asyncio.sleep(0)
    assert not waiting.done()
    answer.release()
    await asyncio.wait_for(waiting, 5.0)


async def test_the_first_answer_wait_ends_at_its_timer_without_a_wake() -> None:
    answer = FirstAnswer()
    await asyncio.wait_for(answer.wait(0.01), 5.0)  # a timer that never fired would fail here
    answer.release()  # after the wait: nothing pending, nothing to resolve
    assert answer.refused is None


async def test_the_pump_waits_while_the_reader_is_a_window_behind() -> None:
    log, lifecycle = log_of(4), Lifecycle(0.0)
    room = Room(log, lifecycle, window_frames=4)
    assert room.needed()
    making = asyncio.ensure_future(room.make(None))
    await asyncio.sleep(0)
    assert not making.done()
    log.acknowledge(2)
    room.freed()
    assert await asyncio.wait_for(making, 5.0) is True


async def test_a_detached_stream_over_its_cap_without_a_store_expires() -> None:
    log = FrameLog(keep_sent=True, max_frames=2, max_bytes=1 << 20)
    for _ in range(3):
        log.append(b"x")
    lifecycle = Lifecycle(5.0)
    lifecycle.attached = False
    assert await Room(log, lifecycle, window_frames=10).make(None) is False
    assert lifecycle.expired


def test_a_settled_stream_is_kept_a_window_after_its_last_reader_left() -> None:
    assert forget_at(left_at=10.0, now=12.0, window_s=5.0, latest=30.0) == 15.0
    assert forget_at(left_at=None, now=12.0, window_s=5.0, latest=30.0) == 17.0, "a reader still reads"
    assert forget_at(left_at=28.0, now=29.0, window_s=5.0, latest=30.0) == 30.0, "never past the ceiling"


def test_the_lifecycle_remembers_when_its_last_reader_left() -> None:
    lifecycle = Lifecycle(grace_s=5.0)
    assert lifecycle.left_at is None, "the opener's reader reads"
    assert lifecycle.detach(lifecycle.generation)
    left = lifecycle.left_at
    assert left is not None
    generation = lifecycle.attach()
    assert lifecycle.left_at is None
    assert not lifecycle.detach(generation - 1), "a superseded reader leaving changes nothing"
    assert lifecycle.left_at is None
    assert lifecycle.release(generation)
    assert lifecycle.left_at is not None and lifecycle.left_at >= left
