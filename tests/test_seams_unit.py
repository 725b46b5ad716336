"""Fast in-process checks of the pure pieces behind tests/test_attacks_seams.py."""

from __future__ import annotations

import json
import math

import pytest

from bali_zero.rag.v1 import rag_pb2
from bridge.errors import BadRequest
from bridge.inputs import Limits, validate
from bridge.resume.keys import StoredStream
from bridge.stream.frames import MAX_SOURCES, FrameEncoder, sources

LIMITS = Limits(max_query_bytes=8192, max_body_bytes=65536, max_history_messages=50)


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


@pytest.mark.parametrize(
    "fields",
    [
        {b"request_id": b"\xff"},
        {b"last_seq": b"abc"},
        {b"final_seq": b"1e9"},
        {b"last_seq": b"9" * 5000},  # over int()'s digit limit: a ValueError too
        {b"owner": b"\xc3"},
    ],
)
def test_stored_stream_damaged_record_reads_as_none(fields: dict[bytes, bytes]) -> None:
    raw = {b"owner": b"abc", b"last_seq": b"1", **fields}
    assert StoredStream.parse("s", raw) is None
    assert StoredStream.unreadable(raw, None)
    assert not StoredStream.unreadable({}, None)
    assert StoredStream.parse("s", {b"owner": b"abc", b"last_seq": b"4"}) is not None


@pytest.mark.parametrize(
    ("field", "value"),
    [("user_email", "a@b.example\n"), ("user_role", "member\n"), ("user_email", "a@b\nc")],
)
def test_identifier_field_with_line_feed_is_refused(field: str, value: str) -> None:
    with pytest.raises(BadRequest, match=field):
        validate({"query": "hi", field: value}, LIMITS)
    assert validate({"query": "hi", "user_email": "a@b.example", "user_role": "member"}, LIMITS).user_role == "member"
