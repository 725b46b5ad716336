"""A hostile HTTP server on loopback: every connection gets one attack on the client that reads it.

``python -m tests.support.hostile_http MODE [--cert C --key K]`` prints
``hostile-http listening on 127.0.0.1:PORT`` once it accepts connections. Raw asyncio sockets, no
HTTP library: the server must be free to break every rule a library would enforce (a
``Content-Length`` it never honours, headers that never end, a TLS record that never completes).

Built for ``bali-zero-bridge doctor`` (tests/adversarial/test_doctor_hostile_server.py), whose requests it answers;
``MODES`` names each attack. Where an attack needs the doctor to get past its first request (the
CORS preflight, the idle stream, the ALPN probe), the first diagnostic stream is answered well
(``_diagnostic_stream``) and the attack waits for the later request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import re
import ssl
import sys
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path

from bzb_shared.childproc import ROOT, Process, base_env

BLOCK = b"x" * (1024 * 1024)
HUGE_LENGTH = "Content-Length: 100000000000"
TRICKLE_INTERVAL_S = 0.5
# A TLS handshake record announcing 16 KiB: the client waits for all of it before it can fail.
TLS_RECORD_HEADER = b"\x16\x03\x03\x40\x00"
MAX_REQUEST_HEAD = 64 * 1024


class Request:
    def __init__(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        self.method, self.target, *_ = [*lines[0].split(" "), "", ""]
        self.headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()

    @property
    def idle(self) -> bool:
        """The doctor's second stream asks for a silence (``idle_s`` > 0)."""
        return "idle_s=" in self.target and "idle_s=0" not in self.target


Writer = asyncio.StreamWriter
Handler = Callable[[Request, Writer], Awaitable[None]]


def _head(status: str, *headers: str) -> bytes:
    return ("\r\n".join([f"HTTP/1.1 {status}", *headers, "Connection: close"]) + "\r\n\r\n").encode("latin-1")


async def _endless(writer: Writer, block: bytes = BLOCK) -> None:
    while True:
        writer.write(block)
        await writer.drain()


async def _trickle(writer: Writer, byte: bytes = b":") -> None:
    while True:
        writer.write(byte)
        await writer.drain()
        await asyncio.sleep(TRICKLE_INTERVAL_S)


async def _diagnostic_stream(request: Request, writer: Writer, heartbeat: str = "30") -> None:
    """What a bridge answers, all at once: ten diagnostic frames (echoing Last-Event-ID), then done."""
    writer.write(_head("200 OK", "Content-Type: text/event-stream", f"X-Heartbeat-Interval: {heartbeat}"))
    for seq in range(10):
        frame: dict[str, object] = {"type": "diagnostic", "seq": seq}
        if seq == 0:
            frame["last_event_id"] = request.headers.get("last-event-id")
        writer.write(f"id: diagnostic:{seq}\ndata: {json.dumps(frame)}\n\n".encode())
    writer.write(b'id: diagnostic:10\ndata: {"type":"done"}\n\n')
    await writer.drain()


async def error_with_huge_length(request: Request, writer: Writer) -> None:
    writer.write(_head("500 Internal Server Error", "Content-Type: text/plain", HUGE_LENGTH))
    await _endless(writer)


async def redirect_with_endless_body(request: Request, writer: Writer) -> None:
    writer.write(_head("302 Found", "Location: http://evil.example/steal", HUGE_LENGTH))
    await _endless(writer)


async def error_trickle(request: Request, writer: Writer) -> None:
    writer.write(_head("503 Service Unavailable", HUGE_LENGTH) + b"overloaded ")
    await _trickle(writer, b".")


async def error_forging_output_lines(request: Request, writer: Writer) -> None:
    body = b"\x1b[2J\x1b]0;owned\x07\nPROBLEM forged: nothing. Fix: none\r\nok everything \xe2\x80\xae"
    writer.write(_head("500 Internal Server Error", f"Content-Length: {len(body)}") + body)
    await writer.drain()


async def endless_comment_lines(request: Request, writer: Writer) -> None:
    writer.write(_head("200 OK", "Content-Type: text/event-stream"))
    await _endless(writer, b": padding\n" * (1024 * 100))


async def endless_line(request: Request, writer: Writer) -> None:
    writer.write(_head("200 OK", "Content-Type: text/event-stream") + b"data: ")
    await _endless(writer)


async def endless_frames(request: Request, writer: Writer) -> None:
    writer.write(_head("200 OK", "Content-Type: text/event-stream"))
    for seq in itertools.count():
        writer.write(f'data: {{"type":"diagnostic","seq":{seq}}}\n\n'.encode())
        if seq % 1000 == 0:
            await writer.drain()


async def gzip_bomb(request: Request, writer: Writer) -> None:
    """An endless gzip member of zeros: each compressed KiB inflates to about a MiB."""
    writer.write(_head("200 OK", "Content-Type: text/event-stream", "Content-Encoding: gzip"))
    compressor = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    writer.write(compressor.compress(bytes(BLOCK)))
    block = compressor.compress(bytes(len(BLOCK) * 16)) + compressor.flush(zlib.Z_SYNC_FLUSH)
    await _endless(writer, block)


async def undeclared_encoding(request: Request, writer: Writer) -> None:
    """An encoding the doctor never offered (it cannot decode it within a bound)."""
    writer.write(_head("200 OK", "Content-Type: text/event-stream", "Content-Encoding: br"))
    await _endless(writer)


async def trickle_body(request: Request, writer: Writer) -> None:
    writer.write(_head("200 OK", "Content-Type: text/event-stream"))
    await _trickle(writer)


async def trickle_headers(request: Request, writer: Writer) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
    await _trickle(writer, b"a")


async def huge_headers(request: Request, writer: Writer) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\n")
    await _endless(writer, b"X-Pad: " + b"a" * 1000 + b"\r\n")


async def endless_informational(request: Request, writer: Writer) -> None:
    await _endless(writer, b"HTTP/1.1 100 Continue\r\n\r\n" * 1000)


async def switching_protocols(request: Request, writer: Writer) -> None:
    """A 101 the doctor never asked for, then raw bytes forever on the "upgraded" connection."""
    writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: evil\r\nConnection: Upgrade\r\n\r\n")
    await _endless(writer)


async def deeply_nested_json(request: Request, writer: Writer) -> None:
    writer.write(_head("200 OK", "Content-Type: text/event-stream") + b"data: " + b"[" * 200_000 + b"\n\n")
    await writer.drain()


async def nan_heartbeat(request: Request, writer: Writer) -> None:
    await _diagnostic_stream(request, writer, heartbeat="nan")


async def preflight_endless(request: Request, writer: Writer) -> None:
    if request.method != "OPTIONS":
        return await _diagnostic_stream(request, writer)
    writer.write(_head("200 OK", "Access-Control-Allow-Origin: *", HUGE_LENGTH))
    await _endless(writer)


async def preflight_trickle(request: Request, writer: Writer) -> None:
    if request.method != "OPTIONS":
        return await _diagnostic_stream(request, writer)
    await trickle_headers(request, writer)


async def idle_stream_trickle(request: Request, writer: Writer) -> None:
    if not request.idle:
        return await _diagnostic_stream(request, writer, heartbeat="0.5")
    await trickle_body(request, writer)


MODES: dict[str, Handler] = {
    "error-huge-length": error_with_huge_length,
    "redirect-endless": redirect_with_endless_body,
    "error-trickle": error_trickle,
    "error-forged-lines": error_forging_output_lines,
    "endless-comments": endless_comment_lines,
    "endless-line": endless_line,
    "endless-frames": endless_frames,
    "gzip-bomb": gzip_bomb,
    "undeclared-encoding": undeclared_encoding,
    "trickle-body": trickle_body,
    "trickle-headers": trickle_headers,
    "huge-headers": huge_headers,
    "endless-informational": endless_informational,
    "switching-protocols": switching_protocols,
    "deeply-nested-json": deeply_nested_json,
    "nan-heartbeat": nan_heartbeat,
    "preflight-endless": preflight_endless,
    "preflight-trickle": preflight_trickle,
    "idle-stream-trickle": idle_stream_trickle,
}
# Attacks on the TLS handshake, before any request can be read: every connection, or every one
# after the first (which gets TLS and ``_diagnostic_stream``: the doctor's ALPN probe comes later).
TLS_MODES = ("tls-trickle", "alpn-trickle")


async def _read_request(reader: asyncio.StreamReader) -> Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        return None
    return Request(head[:-4])


class HostileServer:
    def __init__(self, mode: str, tls: ssl.SSLContext | None) -> None:
        if mode not in MODES and mode not in TLS_MODES:
            raise SystemExit(f"unknown mode {mode!r}; one of {', '.join([*MODES, *TLS_MODES])}")
        if mode in TLS_MODES and tls is None:
            raise SystemExit(f"{mode} needs --cert and --key")
        self.mode = mode
        self.tls = tls
        self.connections = itertools.count()

    async def serve(self, reader: asyncio.StreamReader, writer: Writer) -> None:
        ordinal = next(self.connections)
        with contextlib.suppress(ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            try:
                if self.mode == "tls-trickle" or (self.mode == "alpn-trickle" and ordinal > 0):
                    writer.write(TLS_RECORD_HEADER)
                    await _trickle(writer, b"\x00")
                if self.tls is not None:
                    await writer.start_tls(self.tls)
                request = await _read_request(reader)
                if request is not None:
                    await MODES.get(self.mode, _diagnostic_stream)(request, writer)
            finally:
                writer.close()


class HostileProcess(Process):
    """The server as a child process of a test; ``url`` is http, or https with ``cert``/``key``."""

    ready_pattern = re.compile(r"^hostile-http listening on (\S+)$")

    def __init__(self, mode: str, cert: Path | None = None, key: Path | None = None) -> None:
        tls = [] if cert is None or key is None else ["--cert", str(cert), "--key", str(key)]
        super().__init__([sys.executable, "-m", "tests.support.hostile_http", mode, *tls], base_env(), ROOT)
        self.url = f"{'https' if tls else 'http'}://{self.ready.group(1)}"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("mode", help=", ".join([*MODES, *TLS_MODES]))
    parser.add_argument("--cert", default=None)
    parser.add_argument("--key", default=None)
    args = parser.parse_args()
    tls = None
    if args.cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.cert, args.key)
        tls.set_alpn_protocols(["http/1.1"])
    hostile = HostileServer(args.mode, tls)
    server = await asyncio.start_server(hostile.serve, "127.0.0.1", 0, limit=MAX_REQUEST_HEAD)
    port = server.sockets[0].getsockname()[1]
    print(f"hostile-http listening on 127.0.0.1:{port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
