"""What bounds the bytes and the text ``bali-zero-bridge doctor`` takes from a server.

The doctor runs against URLs its user does not control, through proxies nobody audited: every
byte, header value and error body it reads may be hostile. The runner (bridge/doctor/probe.py) bounds
time; this module bounds the rest:

* a body is decoded (``Content-Encoding``) with a ceiling on the output, so a compressed bomb
  stops at the ceiling instead of inflating a whole network read (a KiB of gzip is a MiB of
  zeros) before anything can count it;
* an error body is sampled, never read whole: a ``500`` with ``Content-Length: 10^11`` and an
  endless body costs ``ERROR_BODY_BYTES``;
* anything a server sent that reaches the terminal goes through ``printable``: one line, no
  control characters, bounded length, so a body or header cannot forge ``PROBLEM``/``ok`` lines
  or send escape sequences to the operator's terminal.
"""

from __future__ import annotations

import zlib

# The diagnostic stream is ~2 KiB; this is room for any proxy's additions, and the most a
# hostile server can make the doctor hold (on the wire and decoded).
MAX_STREAM_BYTES = 256 * 1024
# An error body is only quoted, so a sample is all the doctor reads of it, and only briefly.
ERROR_BODY_BYTES = 2048
ERROR_BODY_S = 1.0
# Server-provided text quoted inside a message, and one whole output line.
QUOTED_CHARS = 200
LINE_CHARS = 2000
# The encodings the doctor offers (what it can decode within a bound); a compressing proxy on
# the path uses one of them when the client offers it, which is what the compression check needs.
ACCEPT_ENCODING = "gzip, deflate"
_INFLATED = {"gzip", "x-gzip", "deflate"}


class BoundedDecoder:
    """Undoes one ``Content-Encoding`` (identity, gzip or zlib-wrapped deflate) and never yields
    more than ``cap`` bytes in total; ``exceeded`` is set when the body had more."""

    def __init__(self, inflate: bool, cap: int) -> None:
        # wbits 32 + 15: zlib or gzip header, detected from the first bytes.
        self._inflater = zlib.decompressobj(32 + zlib.MAX_WBITS) if inflate else None
        self.left = cap
        self.exceeded = False

    def decode(self, data: bytes) -> bytes:
        """Raises zlib.error on a body that is not what its encoding says."""
        if self._inflater is not None:
            # One byte beyond the cap tells "more" from "exactly the cap"; below max_length zlib
            # has consumed all of ``data``, so nothing is silently left in unconsumed_tail.
            data = self._inflater.decompress(data, self.left + 1)
        if len(data) > self.left:
            self.exceeded = True
            data = data[: self.left]
        self.left -= len(data)
        return data


def decoder_for(content_encoding: str | None, cap: int) -> BoundedDecoder | None:
    """The decoder for a response's ``Content-Encoding``; None for an encoding the doctor did not
    offer (brotli, zstd, a chain of several): those cannot be inflated within a bound here."""
    encoding = (content_encoding or "").strip().lower()
    if encoding in ("", "identity"):
        return BoundedDecoder(False, cap)
    if encoding in _INFLATED:
        return BoundedDecoder(True, cap)
    return None


def printable(text: str, limit: int = QUOTED_CHARS) -> str:
    """``text`` safe to print as part of one line: control and format characters (CR, LF, ESC,
    C1 controls, bidi overrides) escaped, at most ``limit`` characters (then "...")."""
    pieces = [c if c.isprintable() else repr(c)[1:-1] for c in text[: limit + 1]]
    if sum(map(len, pieces)) <= limit:
        return "".join(pieces)
    kept, used = [], len("...")
    for piece in pieces:  # whole escapes only: a cut one would leave a dangling backslash
        used += len(piece)
        if used > limit:
            break
        kept.append(piece)
    return "".join(kept) + "..."
