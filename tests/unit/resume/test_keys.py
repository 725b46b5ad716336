"""The resume store's record format (bridge/resume/keys.py), in process: a damaged record is no record."""

from __future__ import annotations

import pytest

from bridge.resume.keys import StoredStream


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
