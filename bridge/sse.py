"""Server-Sent Events framing (pure functions) and a WHATWG-conforming parser.

The encoder never writes raw text into a field: frame data is JSON, which escapes CR and LF,
so a token such as ``"\\nid: 9\\n\\n"`` cannot inject fields or end a frame early. Should a
caller ever pass data with a line break, it is split into several ``data:`` lines, which a
conforming client joins back with LF (a lone CR or a CRLF cannot survive that, which is why
the bridge only ever sends JSON).

The parser follows the HTML standard's "event stream interpretation" and is shared by tests,
benchmarks and tools; the browser client implements the same rules and runs the same vectors
(tests/vectors/sse_vectors.json).
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from json.encoder import encode_basestring

from bridge.errors import FrameError

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_BAD_ID = re.compile(r"[\r\n\x00]")


MEDIA_TYPE = "text/event-stream; charset=utf-8"


def response_headers(heartbeat_interval_s: float, headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    """The raw headers of an event-stream response; ``headers`` add to or override the base set.

    ``no-transform`` and ``x-accel-buffering: no`` keep proxies from compressing or buffering the
    frames (what ``bali-zero-bridge doctor`` checks on the path); ``x-heartbeat-interval`` tells the
    browser client's watchdog how long silence may last.
    """
    base = {
        "content-type": MEDIA_TYPE,
        "cache-control": "no-cache, no-transform",
        "x-accel-buffering": "no",
        "connection": "keep-alive",
        "x-heartbeat-interval": f"{heartbeat_interval_s:g}",
    }
    base.update({name.lower(): value for name, value in headers.items()})
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in base.items()]


def frame(event_id: str, data: str, event: str | None = None) -> bytes:
    """One complete event: optional ``event:``, ``id:``, one ``data:`` line per line of data, blank line."""
    if _BAD_ID.search(event_id):
        raise FrameError("event id must not contain CR, LF or NUL")
    head = f"id: {event_id}\n"
    if event is not None:
        if _BAD_ID.search(event) or not event:
            raise FrameError("event name must be non-empty without CR, LF or NUL")
        head = f"event: {event}\n{head}"
    if "\n" in data or "\r" in data:
        body = "".join(f"data: {line}\n" for line in _LINE_BREAK.split(data))
    else:
        body = f"data: {data}\n"
    return (head + body + "\n").encode("utf-8")


def json_frame(event_id: str, payload: object, event: str | None = None) -> bytes:
    """A frame whose data is ``payload`` as compact JSON (UTF-8 kept, CR/LF/NUL escaped)."""
    return frame(event_id, json.dumps(payload, ensure_ascii=False, separators=(",", ":")), event)


def token_frame(event_id: str, index: int, text: str) -> bytes:
    """The hot path: a ``token`` frame without building a dict per token.

    ``encode_basestring`` is the C function behind ``json.dumps(text, ensure_ascii=False)`` (same
    output, checked by tests/unit/test_sse_properties.py), without the encoder object ``dumps`` builds per call.
    """
    encoded = encode_basestring(text)
    return f'id: {event_id}\ndata: {{"type":"token","index":{index},"text":{encoded}}}\n\n'.encode()


def retry_field(milliseconds: int) -> bytes:
    """A ``retry:`` hint; the standard accepts ASCII digits only."""
    return f"retry: {max(0, int(milliseconds))}\n\n".encode("ascii")


@dataclass(frozen=True, slots=True)
class Event:
    """A dispatched event as a browser's EventSource would see it."""

    type: str
    data: str
    last_event_id: str


class Parser:
    """Incremental event-stream parser: feed bytes, get the events a browser would dispatch."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending: list[str] = []  # pieces of a line whose end has not arrived yet
        self._skip_lf = False  # the last chunk ended in CR: an LF first in the next one is its pair
        self._first = True
        self._data: list[str] = []
        self._type = ""
        self._id_buffer = ""
        self.last_event_id = ""
        self.retry_ms: int | None = None

    def feed(self, chunk: bytes) -> list[Event]:
        text = self._decoder.decode(chunk)
        if self._first and text:
            text = text.removeprefix("\ufeff")
            self._first = False
        return self._consume(text)

    def close(self) -> list[Event]:
        """End of stream: an incomplete line or event is discarded, as the standard says."""
        self._consume(self._decoder.decode(b"", final=True))
        self._pending = []
        return []

    def _consume(self, text: str) -> list[Event]:
        # A CR ends its line at once (a browser does not wait for a possible LF), so an event
        # closed by a lone CR is dispatched even when nothing follows it.
        if not text:
            return []
        if self._skip_lf and text[0] == "\n":
            text = text[1:]
        self._skip_lf = False
        events: list[Event] = []
        start = 0
        for match in _LINE_BREAK.finditer(text):
            line = text[start : match.start()]
            if self._pending:
                line = "".join(self._pending) + line
                self._pending = []
            event = self._line(line)
            if event is not None:
                events.append(event)
            start = match.end()
            if match.group() == "\r" and start == len(text):
                self._skip_lf = True
        if start < len(text):
            self._pending.append(text[start:])
        return events

    def _line(self, line: str) -> Event | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._type = value
        elif name == "id":
            if "\x00" not in value:
                self._id_buffer = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry_ms = int(value)
        return None

    def _dispatch(self) -> Event | None:
        self.last_event_id = self._id_buffer
        if not self._data:
            self._type = ""
            return None
        event = Event(self._type or "message", "\n".join(self._data), self.last_event_id)
        self._data, self._type = [], ""
        return event
