"""The one HTTP/1.1 client of the benchmarks: a request, its response head, and the body as it arrives.

The load generator and the soak both need thousands of concurrent event streams with per-read
timing, which general-purpose clients do not give cheaply (they buffer, pool, or decode for you).
Both use this one copy, header parsing included, so chunked decoding and framing rules are right in
one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

READ_SIZE = 256 * 1024
NO_BODY_STATUSES = frozenset({204, 304})


class ChunkedDecoder:
    """Incremental ``Transfer-Encoding: chunked`` decoder; ``finished`` after the last chunk and trailers."""

    __slots__ = ("_buf", "_crlf", "_remaining", "_trailers", "finished")

    def __init__(self) -> None:
        self._buf = b""
        self._remaining = 0
        self._crlf = False
        self._trailers = False
        self.finished = False

    def feed(self, data: bytes) -> bytes:
        buf = self._buf + data if self._buf else data
        out: list[bytes] = []
        pos, end = 0, len(buf)
        while pos < end and not self.finished:
            if self._remaining:
                take = min(self._remaining, end - pos)
                out.append(buf[pos : pos + take])
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._crlf = True
                continue
            if self._crlf:
                if end - pos < 2:
                    break
                pos += 2
                self._crlf = False
                continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            line = buf[pos:eol]
            pos = eol + 2
            if self._trailers:
                if not line:
                    self.finished = True
                continue
            size = int(line.split(b";", 1)[0], 16)
            if size == 0:
                self._trailers = True
            else:
                self._remaining = size
        self._buf = buf[pos:]
        return out[0] if len(out) == 1 else b"".join(out)


class LengthDecoder:
    """A body of ``Content-Length`` bytes (0 for statuses that never have one)."""

    __slots__ = ("_remaining", "finished")

    def __init__(self, length: int) -> None:
        self._remaining = length
        self.finished = length <= 0

    def feed(self, data: bytes) -> bytes:
        body = data[: self._remaining]
        self._remaining -= len(body)
        self.finished = self._remaining <= 0
        return body


class UntilCloseDecoder:
    """A body that ends when the server closes the connection (HTTP/1.0 style)."""

    __slots__ = ("finished",)

    def __init__(self) -> None:
        self.finished = False

    def feed(self, data: bytes) -> bytes:
        return data


BodyDecoder = ChunkedDecoder | LengthDecoder | UntilCloseDecoder


@dataclass(frozen=True, slots=True)
class ResponseHead:
    status: int
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, raw: bytes) -> ResponseHead:
        """Status line and headers up to the blank line; names lower-cased, a repeated name keeps the last."""
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        return cls(status, headers)

    @property
    def is_event_stream(self) -> bool:
        return self.headers.get("content-type", "").startswith("text/event-stream")

    @property
    def keep_alive(self) -> bool:
        return self.headers.get("connection", "").lower() != "close"

    def body_decoder(self, method: str) -> BodyDecoder:
        if method == "HEAD" or self.status in NO_BODY_STATUSES:
            return LengthDecoder(0)
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            return ChunkedDecoder()
        if "content-length" in self.headers:
            return LengthDecoder(int(self.headers["content-length"]))
        return UntilCloseDecoder()


class HttpError(Exception):
    """The server answered something this client cannot follow (not an HTTP status it disliked)."""


class Http1Connection:
    """One HTTP/1.1 connection: requests one after another (keep-alive), bodies read piece by piece.

    ``timeout`` bounds connecting plus reading a response head, and each body read, so a stuck
    server cannot hang a benchmark (every run here must stop by itself).
    """

    def __init__(self, host: str, port: int, *, rcvbuf: int | None = None, timeout: float | None = None) -> None:
        self.host, self.port, self.rcvbuf, self.timeout = host, port, rcvbuf, timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.head = ResponseHead(0)
        self.decoder: BodyDecoder = LengthDecoder(0)
        self.eof = False  # the peer closed: the connection cannot carry another request

    @property
    def connected(self) -> bool:
        return self.writer is not None

    async def connect(self) -> None:
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (self.host, self.port))
        except BaseException:
            sock.close()
            raise
        self.reader, self.writer = await asyncio.open_connection(sock=sock, limit=READ_SIZE)

    async def request(
        self, method: str, path: str, headers: Mapping[str, str] | None = None, body: bytes = b""
    ) -> ResponseHead:
        """Send one request (connecting first if needed) and read its response head."""
        async with asyncio.timeout(self.timeout):
            if self.writer is None:
                await self.connect()
            assert self.reader is not None and self.writer is not None
            lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
            lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
            if body or method not in ("GET", "HEAD", "DELETE"):
                lines.append(f"Content-Length: {len(body)}")
            self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
            try:
                raw = await self.reader.readuntil(b"\r\n\r\n")
            except asyncio.LimitOverrunError as exc:
                raise HttpError("response head larger than the read buffer") from exc
        self.head = ResponseHead.parse(raw)
        self.decoder = self.head.body_decoder(method)
        return self.head

    async def read(self) -> bytes | None:
        """The next piece of body (possibly empty), or None once the body ended or the peer closed."""
        if self.decoder.finished or self.reader is None:
            return None
        async with asyncio.timeout(self.timeout):
            data = await self.reader.read(READ_SIZE)
        if not data:
            self.eof = self.decoder.finished = True
            return None
        return self.decoder.feed(data)

    async def pieces(self) -> AsyncIterator[bytes]:
        while (piece := await self.read()) is not None:
            yield piece

    async def body(self, limit: int = 1 << 20) -> bytes:
        """The whole (small) body; longer than ``limit`` bytes is an error, not a hang or a heap."""
        parts: list[bytes] = []
        size = 0
        async for piece in self.pieces():
            size += len(piece)
            if size > limit:
                raise HttpError(f"body longer than {limit} bytes")
            parts.append(piece)
        return b"".join(parts)

    def close(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(RuntimeError):  # the loop may already be closing
                self.writer.close()
        self.reader = self.writer = None
        self.eof = False
