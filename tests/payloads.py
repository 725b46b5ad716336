"""The token payloads of the SSE edge-case list (SSE-EDGE-CASES) that every suite pushes end to end."""

from __future__ import annotations

# A delimiter no payload contains: with `rag-stub --echo-delimiter ␞` the query "a␞b" streams
# exactly the tokens "a" and "b", so a test chooses token boundaries precisely.
DELIM = "\u241e"

EDGE_TOKENS: dict[str, list[str]] = {
    "lf": ["a", "\n", "b"],
    "crlf": ["a", "\r\n", "b"],
    "lone_cr": ["a", "\r", "b"],
    "data_injection": ["data: injected"],
    "id_injection": ["\nid: 9\n\n", "x"],
    "leading_space": [" leading", "  two"],
    "empty_token": ["a", "", "b"],
    "line_separators": ["\u2028", "\u2029", "z"],
    "nul": ["\u0000", "after-nul"],
    "emoji_and_combining": ["👩‍👩‍👧", "é", "e\u0301"],
    "rtl": ["שלום", " ", "مرحبا"],
}
BIG_TOKEN = ["x" * 65536]
MANY_TOKENS = ["abcdefghij"[i % 10] for i in range(10_000)]


def as_query(tokens: list[str]) -> str:
    return DELIM.join(tokens)
