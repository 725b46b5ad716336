"""Splitting answers into tokens without losing a single character."""

from __future__ import annotations

import re

# A run of non-space characters with the whitespace after it, or leading whitespace on its own.
_PIECE = re.compile(r"\S+\s*|\s+", re.DOTALL)


def split_words(text: str) -> list[str]:
    """Word-like tokens; ``"".join(split_words(t)) == t`` for every string."""
    return _PIECE.findall(text)


def split_echo(query: str, delimiter: str | None) -> list[str]:
    """Tokens of echo mode: words, or exact pieces between ``delimiter`` (empty pieces kept).

    The delimiter form lets tests choose token boundaries exactly, including empty tokens and
    a single very long token.
    """
    if delimiter:
        return query.split(delimiter)
    return split_words(query)
