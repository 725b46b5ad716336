"""Frames and their event ids, in process: what the bridge issues, what a reconnect may carry."""

from __future__ import annotations

import json
import math

import pytest

from bali_zero.rag.v1 import rag_pb2
from bridge.stream.frames import MAX_SOURCES, FrameEncoder, parse_event_id, parse_seq, resume_point, sources


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("abc_-9:0", ("abc_-9", 0)),
        ("s:123456789012345678", ("s", 123456789012345678)),
        ("s:1234567890123456789", None),  # 19 digits: beyond the bridge's own ids
        ("s:²", None),  # str.isdigit() accepts it; the bridge never issues it
        ("s:1\n", None),
        ("s\r:1", None),
        (":1", None),
        ("s:", None),
        ("a" * 65 + ":1", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_event_id_accepts_only_the_alphabet_the_bridge_issues(value: str | None, expected: object) -> None:
    assert parse_event_id(value) == expected


def test_bare_seq_needs_the_connection_id_header() -> None:
    assert parse_seq("17") == 17 and parse_seq("x") is None and parse_seq("") is None
    assert resume_point("17", None, "abc") == ("abc", 17)
    assert resume_point("17", None, None) is None
    assert resume_point(None, "abc:3", None) == ("abc", 3)
    assert resume_point("abc:4", "other:9", None) == ("abc", 4)  # the header wins
    assert resume_point("17", None, "bad id!") is None


def test_sources_send_every_score_as_a_finite_number_in_the_same_order() -> None:
    scores = [math.nan, math.inf, -math.inf, 2.5, -0.0]
    meta = rag_pb2.Metadata(sources=[rag_pb2.Source(title="t", uri="u", score=s) for s in scores])
    sent = [s["score"] for s in sources(meta)]
    assert sent == [0.0, 1.7976931348623157e308, -1.7976931348623157e308, 2.5, -0.0]
    json.dumps(sent, allow_nan=False)  # raises on NaN or Infinity


def test_sources_are_cut_to_the_first_max_sources() -> None:
    meta = rag_pb2.Metadata(sources=[rag_pb2.Source(title=str(i)) for i in range(MAX_SOURCES + 5)])
    assert [s["title"] for s in sources(meta)] == [str(i) for i in range(MAX_SOURCES)]


def test_token_frame_index_is_the_given_position_not_the_upstream_field() -> None:
    frame = FrameEncoder("s", "r").token(7, 3, rag_pb2.Token(index=0, text="x"))
    assert frame == b'id: s:7\ndata: {"type":"token","index":3,"text":"x"}\n\n'
