"""The replay buffer and write coalescing, in-process (bridge/stream/replay.py)."""

from __future__ import annotations

from collections import deque

import pytest

from bridge.stream.replay import COALESCE_BYTES, FrameLog, Replay, coalesce


def frame(seq: int, size: int = 10) -> bytes:
    return f"id: s:{seq}\n".encode().ljust(size, b".")


def filled(n: int, *, keep: bool = True, max_frames: int = 100, max_bytes: int = 1 << 20) -> FrameLog:
    log = FrameLog(keep_sent=keep, max_frames=max_frames, max_bytes=max_bytes)
    for seq in range(1, n + 1):
        assert log.append(frame(seq)) == seq
    return log


def test_coalesce_joins_everything_under_the_limit_and_names_the_last_seq() -> None:
    frames = deque([(1, b"a"), (2, b"bb"), (3, b"ccc")])
    assert coalesce(frames, 6, 0) == (b"abbccc", 3)
    assert coalesce(deque(), 0, 7) == (b"", 7)


def test_coalesce_stops_before_the_frame_that_would_pass_64k() -> None:
    half = b"x" * (COALESCE_BYTES // 2)
    frames = deque([(1, half), (2, half), (3, b"y")])
    body, last = coalesce(frames, 2 * len(half) + 1, 0)
    assert last == 2 and body == half + half


def test_coalesce_sends_one_oversized_frame_alone() -> None:
    big = b"z" * (COALESCE_BYTES + 1)
    body, last = coalesce(deque([(5, big), (6, b"after")]), len(big) + 5, 4)
    assert (body, last) == (big, 5)


def test_take_then_acknowledge_moves_frames_to_sent_once() -> None:
    log = filled(3)
    body, last = log.take()
    assert last == 3 and body == frame(1) + frame(2) + frame(3)
    log.acknowledge(last)
    assert log.take() == (b"", 3) and log.sent_seq == 3 and log.lag == 0
    assert log.held_bytes == 30  # kept for a reconnect


def test_without_a_resume_window_sent_frames_are_forgotten() -> None:
    log = filled(3, keep=False)
    log.acknowledge(3)
    assert log.held_bytes == 0
    assert log.replay(1) is Replay.GONE


def test_rewind_resends_only_what_the_reader_missed() -> None:
    log = filled(5)
    log.acknowledge(5)
    log.rewind(2)
    assert log.take() == (frame(3) + frame(4) + frame(5), 5)
    assert log.sent_seq == 2


def test_rewind_past_unsent_frames_does_not_send_them_twice() -> None:
    """A reader that got frames 1..3 from another instance resumes here after 3."""
    log = filled(5)
    log.rewind(3)
    assert log.take() == (frame(4) + frame(5), 5)


def test_sent_frames_are_trimmed_to_the_frame_cap() -> None:
    log = filled(10, max_frames=4)
    log.acknowledge(10)
    assert log.replay(6) is Replay.READY  # frames 7..10 still held
    assert log.replay(5) is Replay.GONE
    assert log.held_bytes == 40


def test_sent_frames_are_trimmed_to_the_byte_cap() -> None:
    log = filled(10, max_bytes=25)
    log.acknowledge(10)
    assert log.held_bytes <= 25 and log.replay(8) is Replay.READY and log.replay(7) is Replay.GONE


def test_an_id_never_issued_is_never_sent() -> None:
    log = filled(3)
    assert log.replay(4) is Replay.NEVER_SENT
    assert log.replay(3) is Replay.READY and log.replay(0) is Replay.READY


def test_trim_stored_drops_only_what_the_store_holds_down_to_the_cap() -> None:
    log = filled(10, max_frames=4)
    log.trim_stored(stored_seq=3)  # the store has 1..3: those go, 4..10 stay (over cap, not stored)
    assert log.unsent_frames == 7 and log.trimmed_through == 3
    assert log.replay(2) is Replay.TRIMMED and log.replay(3) is Replay.READY
    log.trim_stored(stored_seq=10)
    assert log.unsent_frames == 4 and log.trimmed_through == 6


def test_appending_with_given_seqs_keeps_them() -> None:
    """The remote reader appends frames under the seq they were stored with."""
    log = FrameLog(keep_sent=False, max_frames=10, max_bytes=1 << 20)
    log.rewind(41)
    log.append(b"a", 42)
    log.append(b"b", 43)
    assert log.take() == (b"ab", 43) and log.last_seq == 43


@pytest.mark.parametrize("acks", [[1, 2, 3], [3], [2, 3]])
def test_acknowledging_in_steps_or_at_once_ends_the_same(acks: list[int]) -> None:
    log = filled(3)
    for seq in acks:
        log.acknowledge(seq)
    assert log.sent_seq == 3 and not log.has_unsent and log.held_bytes == 30


def test_frames_written_before_a_sink_is_attached_are_held_for_it() -> None:
    """A new stream's first frames leave before it is announced; its sink must still get them."""
    log = FrameLog(keep_sent=False, max_frames=10, max_bytes=1 << 20)
    log.keep_sent_frames(True)  # opening
    log.append(b"a")
    log.append(b"b")
    log.acknowledge(1)  # the pump wrote the first frame
    assert list(log.held()) == [(1, b"a"), (2, b"b")]
    log.keep_sent_frames(False)  # announced, no resume window: written frames are forgotten
    assert list(log.held()) == [(2, b"b")] and log.held_bytes == 1
