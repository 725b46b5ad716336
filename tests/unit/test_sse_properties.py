"""Property tests of the SSE encoder and of the two parsers (Python ``bridge.sse.Parser`` and the
browser client's ``EventStreamParser``).

- any text survives ``token_frame`` / ``json_frame`` → ``Parser`` unchanged, however the bytes are
  chunked;
- Python and JS parsers give identical events, last event id and retry on arbitrary byte streams
  (CR, LF, CRLF split across chunks, NUL, BOM, invalid or split UTF-8, field-like fragments).
  node runs once per batch of cases.

Bounded by ``FUZZ_EXAMPLES`` (default small; ``make fuzz`` raises it).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge import sse
from bridge.errors import FrameError
from tests.conftest import require_binary

ROOT = Path(__file__).resolve().parents[2]
CLIENT_JS = ROOT / "bridge" / "static" / "bali-zero-stream-client.js"
EXAMPLES = max(20, int(os.environ.get("FUZZ_EXAMPLES", "100")))
BATCHES = max(5, EXAMPLES // 20)
JS_SAFE_INT = 2**53

PROPERTY = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# Reads [{"chunks": [[byte, ...], ...]}, ...] from the file named by argv[1]; prints one result per case.
NODE_RUNNER = r"""
const fs = require('node:fs');
const { EventStreamParser } = require(process.argv[1]);
const cases = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const out = cases.map(({ chunks }) => {
  const parser = new EventStreamParser();
  const events = [];
  for (const chunk of chunks) events.push(...parser.feed(Uint8Array.from(chunk)));
  parser.close();
  return { events, lastEventId: parser.lastEventId, retry: parser.retry };
});
process.stdout.write(JSON.stringify(out));
"""


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def python_parse(chunks: list[bytes]) -> dict[str, Any]:
    parser = sse.Parser()
    events: list[dict[str, str]] = []
    for chunk in chunks:
        events += [{"type": e.type, "data": e.data, "id": e.last_event_id} for e in parser.feed(chunk)]
    parser.close()
    return {"events": events, "lastEventId": parser.last_event_id, "retry": parser.retry_ms}


def js_parse(batch: list[list[bytes]], tmp_dir: Path) -> list[dict[str, Any]]:
    node = require_binary("node", "nodejs")
    cases = tmp_dir / "cases.json"
    cases.write_text(json.dumps([{"chunks": [list(c) for c in chunks]} for chunks in batch]))
    done = subprocess.run(
        [node, "-e", NODE_RUNNER, str(CLIENT_JS), str(cases)], capture_output=True, check=True, timeout=60
    )
    results: list[dict[str, Any]] = json.loads(done.stdout)
    return results


# -- the encoder and the Python parser ------------------------------------------------------------

cuts = st.lists(st.integers(min_value=0, max_value=10**6), max_size=12)
event_ids = st.text(st.characters(exclude_characters="\r\n\x00", exclude_categories=["Cs"]), max_size=40)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@PROPERTY
@given(text=st.text(), index=st.integers(min_value=0, max_value=2**31), event_id=event_ids, at=cuts)
def test_any_token_text_survives_any_chunking(text: str, index: int, event_id: str, at: list[int]) -> None:
    raw = sse.token_frame(event_id, index, text)
    parsed = python_parse(split(raw, at))
    (event,) = parsed["events"]
    assert event["type"] == "message"
    assert event["id"] == event_id
    assert json.loads(event["data"]) == {"type": "token", "index": index, "text": text}


@PROPERTY
@given(text=st.text(), index=st.integers(min_value=0, max_value=2**31))
def test_token_frame_bytes_equal_the_json_module_s(text: str, index: int) -> None:
    """The hot-path encoder (no dict, no JSONEncoder) writes exactly what ``json_frame`` would."""
    payload = {"type": "token", "index": index, "text": text}
    assert sse.token_frame("s:1", index, text) == sse.json_frame("s:1", payload)


@PROPERTY
@given(
    payload=json_values,
    event_id=event_ids,
    event=st.none()
    | st.text(st.characters(exclude_characters="\r\n\x00", exclude_categories=["Cs"]), min_size=1, max_size=20),
    at=cuts,
)
def test_any_json_payload_survives_any_chunking(payload: Any, event_id: str, event: str | None, at: list[int]) -> None:
    raw = sse.json_frame(event_id, payload, event)
    (parsed,) = python_parse(split(raw, at))["events"]
    assert parsed["type"] == (event or "message")
    assert parsed["id"] == event_id
    assert json.loads(parsed["data"]) == payload


@PROPERTY
@given(texts=st.lists(st.text(), min_size=1, max_size=20), at=cuts)
def test_a_whole_stream_of_tokens_reassembles_exactly(texts: list[str], at: list[int]) -> None:
    raw = b"".join(sse.token_frame(f"s:{i + 1}", i, t) for i, t in enumerate(texts))
    raw += sse.frame(f"s:{len(texts)}", '{"type":"heartbeat"}', event="heartbeat")
    parsed = python_parse(split(raw, at))
    tokens = [json.loads(e["data"]) for e in parsed["events"] if e["type"] == "message"]
    assert "".join(t["text"] for t in tokens) == "".join(texts)
    assert [t["index"] for t in tokens] == list(range(len(texts)))
    assert parsed["lastEventId"] == f"s:{len(texts)}"


@PROPERTY
@given(event_id=st.tuples(st.text(max_size=5), st.sampled_from("\r\n\x00"), st.text(max_size=5)).map("".join))
def test_ids_that_would_corrupt_the_stream_are_refused(event_id: str) -> None:
    with pytest.raises(FrameError):
        sse.json_frame(event_id, {"type": "token"})


# -- Python and JS parsers agree on arbitrary bytes -------------------------------------------------

FRAGMENTS = [
    b"\r",
    b"\n",
    b"\r\n",
    b"\n\n",
    b"\r\r",
    b"\x00",
    b"\xef\xbb\xbf",
    b"\xef\xbb",
    b"\xbf",
    b"data",
    b"data:",
    b"data: ",
    b"id:",
    b"id: ",
    b"event:",
    b"event: heartbeat",
    b"retry:",
    b"retry: 150",
    b":",
    b": comment",
    b" ",
    b"  ",
    b"\xff",
    b"\xfe",
    b"\xc3",
    b"\xa9",
    b"\xc3\xa9",
    b"\xf0\x9f",
    b"\x98\x80",
    b"\xf0\x9f\x98\x80",
    b"\xed\xa0\x80",
    b"\xe2\x80\xa8",
    b"\xc0\xaf",
    b"123",
    b"x",
    b"{}",
    b"\xd9\xa3",
    b"\xc2\xb2",
]
byte_streams = st.lists(st.sampled_from(FRAGMENTS) | st.binary(max_size=6), max_size=40).map(b"".join)
chunked_streams = st.tuples(byte_streams, cuts).map(lambda pair: split(*pair))
encoded_streams = st.lists(st.text(), max_size=5).map(
    lambda texts: [b"".join(sse.token_frame(f"s:{i}", i, t) for i, t in enumerate(texts))]
)


def comparable(result: dict[str, Any]) -> dict[str, Any]:
    """JS numbers are doubles: a retry beyond 2**53 cannot be compared exactly."""
    retry = result["retry"]
    return {**result, "retry": retry if retry is None or retry < JS_SAFE_INT else "big"}


@settings(
    max_examples=BATCHES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
@given(batch=st.lists(chunked_streams | encoded_streams, min_size=1, max_size=60))
def test_python_and_js_parsers_agree_on_arbitrary_bytes(batch: list[list[bytes]], tmp_path: Path) -> None:
    js = js_parse(batch, tmp_path)
    assert len(js) == len(batch)
    for chunks, js_result in zip(batch, js, strict=True):
        assert comparable(python_parse(chunks)) == comparable(js_result), f"chunks: {chunks!r}"


def test_the_vector_file_through_both_parsers(tmp_path: Path) -> None:
    """The shared vectors (strings or byte arrays) one byte at a time, compared across the parsers."""
    vectors = json.loads((ROOT / "tests" / "vectors" / "sse_vectors.json").read_text("utf-8"))["vectors"]
    batch = []
    for vector in vectors:
        data = b"".join(c.encode() if isinstance(c, str) else bytes(c) for c in vector["chunks"])
        batch.append([data[i : i + 1] for i in range(len(data))])
    for chunks, js_result in zip(batch, js_parse(batch, tmp_path), strict=True):
        assert comparable(python_parse(chunks)) == comparable(js_result)
