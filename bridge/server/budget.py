"""The pieces of the connection protocol (bridge/server/protocol.py) that need no uvicorn to reason about.

Each one holds one invariant of the HTTP/1.1 connection and names the attack it stops; the protocol
class only wires them to uvicorn's callbacks.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable
from http import HTTPStatus

from bridge.errors import BridgeError
from bridge.server.uvicorn_fence import FlowControl

# Bytes fed to the parser at a time while a head may be open: the most a head beginning inside a
# slice can be over-charged. Small enough to keep the wire bound close to MAX_HEADER_BYTES, large
# enough that a usual head (a few hundred bytes) is one parser call.
SLICE_BYTES = 1024


class WireBudget:
    """The bytes charged to the request head being read, and to a chunked body's framing.

    httptools (llhttp) has no header size limit: it keeps a header value across reads until the
    value ends, so a limit checked once the head is complete comes after the buffering (one endless
    header would grow the process by every byte sent). Each slice is charged here before the parser
    sees it, so the parser never buffers more than ``max_head_bytes``.

    Counting is exact at the start of a read and after a Content-Length body (the parser is fed up
    to the body's end, so the next head starts a fresh slice); a head that begins inside a slice (a
    pipelined request after a bodiless one or after a chunked body) is charged the whole slice, at
    most ``SLICE_BYTES``: never less than its size, at most that much more.
    """

    def __init__(self, max_head_bytes: int) -> None:
        self.max_head_bytes = max_head_bytes
        self.in_body = False  # between headers complete and message complete
        self.head_begun = False  # a byte of the next request head has arrived
        self._body_remaining: int | None = None  # Content-Length bytes still to parse; None: chunked
        self._head_bytes = 0
        # Chunk-size lines, extensions and trailers parsed since the last body byte of a chunked
        # body: header-like bytes that the parser buffers (a trailer value) but no head count saw.
        self._framing_bytes = 0
        self._slice_bytes = 0  # size of the slice the parser is being fed

    def bytes_arrived(self) -> bool:
        """Note a read; True when it may begin or continue a head (so the head deadline runs)."""
        if self.in_body:
            return False
        self.head_begun = True
        return True

    def next_slice_size(self, available: int) -> int:
        """How many of ``available`` bytes to parse next, charged; 0 when over the limit.

        Inside a Content-Length body the slice ends where the body ends, so the next head is
        counted from its first byte.
        """
        if self.in_body:
            if self._body_remaining is not None and self._body_remaining > 0:
                return min(available, self._body_remaining)
            return self._chunked_slice_size(available)
        size = self._allowance(self._head_bytes, available)
        self._head_bytes += size
        return size

    def _chunked_slice_size(self, available: int) -> int:
        """The next slice of a chunked body; 0 when its framing since the last body byte is over the limit.

        httptools keeps a trailer field's value across reads (concatenating bytes objects, so the
        cost is quadratic), so without this count one connection sending a chunked body followed
        by an endless trailer grows the process and pins its CPU until /healthz stops answering.
        Framing that delivers no body byte is charged like a head; a head pipelined after the body
        is over-charged at most a slice, as for a head after a Content-Length body.
        """
        size = self._allowance(self._framing_bytes, available)
        self._framing_bytes += size
        return size

    def _allowance(self, charged: int, available: int) -> int:
        """The next slice under ``MAX_HEADER_BYTES`` with ``charged`` bytes counted (0: over it)."""
        return max(0, min(available, self.max_head_bytes - charged, SLICE_BYTES))

    def feeding(self, size: int) -> None:
        """The parser is about to be fed a slice of ``size`` bytes (0: the feed is over)."""
        self._slice_bytes = size

    def message_begun(self) -> None:
        """A head began inside the slice being parsed: it is charged that whole slice.

        The parser does not say where in the slice the head began; one begun in an earlier slice
        keeps its count.
        """
        self._head_bytes = max(self._head_bytes, self._slice_bytes)
        self.head_begun = True

    def headers_complete(self, content_length: int | None) -> None:
        self.in_body = True
        self.head_begun = False
        self._head_bytes = 0
        self._framing_bytes = 0
        self._body_remaining = content_length

    def body_parsed(self, size: int) -> None:
        if self._body_remaining is not None:
            self._body_remaining -= size
        else:
            self._framing_bytes = 0  # a chunk's data: the framing count starts again

    def message_complete(self) -> None:
        self.in_body = False
        self._body_remaining = None


class Deadline:
    """One timer that is armed at most once at a time, so re-arming never stacks handles.

    Used for the head deadline: uvicorn's keep-alive timer is cancelled by the first byte of the
    next request and a fresh connection has none, so a client trickling a byte at a time
    (slowloris), or sending nothing, held its connection and parser forever.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, seconds: float, on_expiry: Callable[[], None]) -> None:
        self._loop = loop
        self.seconds = seconds
        self._on_expiry = on_expiry
        self._handle: asyncio.TimerHandle | None = None

    def arm(self) -> None:
        """Start the timer unless it is running: a head's deadline counts from its first byte."""
        if self._handle is None:
            self._handle = self._loop.call_later(self.seconds, self._expired)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _expired(self) -> None:
        self._handle = None
        self._on_expiry()


class HoldableFlow(FlowControl):
    """uvicorn's flow control, plus the bytes read but not parsed while the pipeline is full.

    uvicorn keeps reading while a streamed response watches for disconnects, and parses every
    queued head into a request cycle, so memory would grow with every pipelined GET. While
    bytes are held, reading stays paused even when a response's ``receive()`` resumes it: without
    this, a stream's own watcher let pipelined heads in without bound.
    """

    def __init__(self, transport: asyncio.Transport) -> None:
        super().__init__(transport)
        self._held: bytes | None = None

    @property
    def holding(self) -> bool:
        return self._held is not None

    def hold(self, data: bytes) -> None:
        """Keep ``data`` unparsed and stop reading until ``release``."""
        self._held = data
        self.pause_reading()

    def join(self, data: bytes) -> None:
        """A read already under way when reading paused: it joins the held bytes."""
        assert self._held is not None
        self._held += data

    def release(self) -> bytes:
        """The held bytes, to be parsed now; reading may resume again."""
        assert self._held is not None
        held, self._held = self._held, None
        return held

    def resume_reading(self) -> None:
        if self._held is None:
            super().resume_reading()


class Linger:
    """After a 431, what is still read and dropped so the answer is not lost to a reset.

    Closing a socket with unread input makes the kernel send a reset, and a reset can destroy the
    answer before the client reads it: a browser with an oversized cookie would see a network
    error instead of the 431. So the connection discards (never parses nor keeps) up to
    ``budget_bytes`` more for at most ``seconds``, then closes: a flood is cut off after that.
    """

    def __init__(self, budget_bytes: int, seconds: float) -> None:
        self.budget_bytes = budget_bytes
        self.seconds = seconds
        self._remaining: int | None = None  # set while discarding
        self._timer: asyncio.TimerHandle | None = None

    @property
    def active(self) -> bool:
        return self._remaining is not None

    def start(self, loop: asyncio.AbstractEventLoop, close: Callable[[], None]) -> None:
        self._remaining = self.budget_bytes
        self._timer = loop.call_later(self.seconds, close)

    def discard(self, size: int) -> bool:
        """Drop ``size`` more bytes; False once the budget is spent (close now)."""
        assert self._remaining is not None
        self._remaining -= size
        return self._remaining >= 0

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


def content_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    """The body length the parser will expect, or None when it is chunked or unknown."""
    length: int | None = None
    for name, value in headers:
        if name == b"transfer-encoding":
            return None
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                return None
    return length


def error_response(error: BridgeError, default_headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """The whole HTTP/1.1 response the connection writes itself (431, 408): JSON body, then close."""
    body = json.dumps(error.body(), separators=(",", ":")).encode()
    lines = [f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}".encode()]
    lines += [name + b": " + value for name, value in default_headers]
    lines += [
        b"content-type: application/json",
        b"x-content-type-options: nosniff",  # as every response of the app (bridge/middleware.py)
        b"content-length: " + str(len(body)).encode(),
        b"connection: close",
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body
