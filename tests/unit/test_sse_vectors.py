"""The shared SSE vectors against ``bridge.sse.Parser``, and every edge-case payload through the encoder.

The same file (tests/vectors/sse_vectors.json) runs against the browser client's parser in
tests/js/sse_parser.test.mjs and through a real Chromium EventSource in tests/browser/test_sse_vectors.py,
so the three parsers cannot drift apart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bridge.sse import Parser, json_frame, token_frame

VECTORS: list[dict[str, Any]] = json.loads(
    (Path(__file__).resolve().parents[1] / "vectors" / "sse_vectors.json").read_text(encoding="utf-8")
)["vectors"]

# The token payloads SSE-EDGE-CASES.md says every suite should push through end to end.
EDGE_PAYLOADS: dict[str, str] = {
    "LF": "\n",
    "CRLF": "\r\n",
    "lone CR": "\r",
    "data: injected": "data: injected",
    "id injection": "\nid: 9\n\n",
    "leading space": " leading",
    "empty": "",
    "U+2028": "\u2028",
    "U+2029": "\u2029",
    "NUL": "\x00",
    "ZWJ family": "👩\u200d👩\u200d👧",
    "combining": "e\u0301",
    "precomposed": "é",
    "RTL": "مرحبا بالعالم שלום",
    "64 KiB": ("é\r\n👩\u200d👩\u200d👧 " * 8000)[:65536],
}


def _bytes(chunk: str | list[int]) -> bytes:
    return chunk.encode("utf-8") if isinstance(chunk, str) else bytes(chunk)


def _run(chunks: list[bytes]) -> tuple[list[dict[str, str]], Parser]:
    parser = Parser()
    events = []
    for chunk in chunks:
        events += parser.feed(chunk)
    events += parser.close()
    return [{"type": e.type, "data": e.data, "id": e.last_event_id} for e in events], parser


def _params() -> list[Any]:
    return [pytest.param(v, id=v["name"]) for v in VECTORS]


@pytest.mark.parametrize("vector", _params())
def test_vector(vector: dict[str, Any]) -> None:
    events, parser = _run([_bytes(c) for c in vector["chunks"]])
    assert events == vector["events"]
    if "retry" in vector:
        assert parser.retry_ms == vector["retry"]


@pytest.mark.parametrize("vector", _params())
def test_vector_one_byte_at_a_time(vector: dict[str, Any]) -> None:
    whole = b"".join(_bytes(c) for c in vector["chunks"])
    events, parser = _run([whole[i : i + 1] for i in range(len(whole))])
    assert events == vector["events"]
    if "retry" in vector:
        assert parser.retry_ms == vector["retry"]


@pytest.mark.parametrize("text", list(EDGE_PAYLOADS.values()), ids=list(EDGE_PAYLOADS))
@pytest.mark.parametrize("chunking", ["whole", "bytes", "7-byte"])
def test_token_frame_round_trip(text: str, chunking: str) -> None:
    wire = token_frame("s-1:1", 0, text) + json_frame("s-1:1", {"type": "heartbeat"}, "heartbeat")
    # Parser re-scans its pending line on every feed, so a 64 KiB line fed byte by byte is quadratic
    # (about 35 s); the big payload is cut in 1 KiB and 997-byte pieces instead.
    big = len(wire) > 4096
    size = {"whole": len(wire), "bytes": 1024 if big else 1, "7-byte": 997 if big else 7}[chunking]
    events, parser = _run([wire[i : i + size] for i in range(0, len(wire), size)])
    assert [e["type"] for e in events] == ["message", "heartbeat"]
    assert json.loads(events[0]["data"]) == {"type": "token", "index": 0, "text": text}
    assert parser.last_event_id == "s-1:1"


def test_ten_thousand_one_character_tokens() -> None:
    chars = [chr(0x41 + i % 26) + ("😀" if i % 7 == 0 else "") for i in range(10_000)]
    wire = b"".join(token_frame(f"s:{i + 1}", i, c) for i, c in enumerate(chars))
    events, parser = _run([wire[i : i + 61] for i in range(0, len(wire), 61)])
    assert "".join(json.loads(e["data"])["text"] for e in events) == "".join(chars)
    assert parser.last_event_id == "s:10000"


def test_vectors_cover_every_edge_payload() -> None:
    covered = {v.get("token_text") for v in VECTORS}
    missing = [
        k for k, t in EDGE_PAYLOADS.items() if len(t) < 100 and t not in covered and k not in ("U+2028", "U+2029")
    ]
    assert not missing
