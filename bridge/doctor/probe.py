"""``bali-zero-bridge doctor URL``: what the network path to a bridge does to Server-Sent Events.

Run it where the clients are (or as close as you can get); it reads the bridge's diagnostic
stream (bridge/doctor/stream.py) through whatever proxies sit in between and names each problem
with its fix:

* buffering: ten frames sent 100 ms apart must arrive apart, not in one batch;
* compression: a ``Content-Encoding`` on ``text/event-stream`` (compressors hold frames back);
* a proxy read timeout shorter than the heartbeat: the stream idles a little longer than
  ``HEARTBEAT_INTERVAL_S`` and must not be cut;
* HTTP/1.1 only: browsers then open at most six connections per origin, so the seventh open
  stream waits (ALPN is asked for ``h2`` when the URL is https);
* ``Last-Event-ID`` not forwarded: resume after a dropped connection would restart the answer;
* CORS for ``--origin``: the preflight and the stream must allow that page's origin.

Exit status 0 when nothing is wrong, 1 with one ``PROBLEM`` line per finding, 2 with one
``ERROR`` line when the check itself could not run (unreachable, not a bridge, a server that
misbehaves).

The doctor is pointed at URLs and proxies its user does not control, so it treats every server as
hostile. Each request (connect, TLS handshake, head and body) ends within ``--timeout-s`` (the
idle stream within its silence + ``--timeout-s``) however slowly the server trickles, the
whole run within ``--max-idle-s`` + four times ``--timeout-s`` (usually HEARTBEAT_INTERVAL_S + 5 s);
bodies are read through the byte caps of bridge/doctor/limits.py, never whole; redirects are
reported, not followed (one would send ``--token`` and the checks to a host the user did not
name); and server text reaches the terminal only escaped onto one line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import ssl
import time
import urllib.parse
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from bridge import sse
from bridge.doctor.checks import (
    Report,
    StreamRead,
    check_alpn,
    check_buffering,
    check_compression,
    check_content_type,
    check_cors,
    check_idle,
    check_last_event_id,
    check_plain_http,
    idle_plan,
)
from bridge.doctor.limits import (
    ACCEPT_ENCODING,
    ERROR_BODY_BYTES,
    ERROR_BODY_S,
    LINE_CHARS,
    MAX_STREAM_BYTES,
    BoundedDecoder,
    decoder_for,
    printable,
)
from bridge.doctor.stream import FRAME_INTERVAL_S, FRAMES
from bridge.errors import DoctorError

DIAGNOSTIC_PATH = "/api/v2/bali-zero/chat-stream/diagnostic"
STREAM_PATH = "/api/v2/bali-zero/chat-stream"
REQUEST_TIMEOUT_S = 10.0
MAX_TIMEOUT_S = 120.0


def _diagnostic_url(base: str) -> str:
    parsed = urllib.parse.urlsplit(base)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise DoctorError(f"{base!r} is not an http(s) URL of a bridge (e.g. https://chat.example.com)")
    path = parsed.path.rstrip("/")
    for suffix in (DIAGNOSTIC_PATH, STREAM_PATH):
        path = path.removesuffix(suffix)
    return urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, path + DIAGNOSTIC_PATH, "", ""))


@dataclass
class _Seen:
    """What a stream delivered so far: quoted when the doctor gives up on it."""

    wire_bytes: int = 0
    frames: int = 0

    def __str__(self) -> str:
        return f"{self.wire_bytes} bytes, {self.frames} frames"


class Doctor:
    """The runner: reads the diagnostic stream (and preflight, TLS), each request within its
    deadline, and hands what it saw to the checks in bridge/doctor/checks.py."""

    def __init__(
        self,
        url: str,
        *,
        origin: str | None,
        token: str | None,
        verify: bool | str,
        max_idle_s: float,
        timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> None:
        self.url = _diagnostic_url(url)
        self.origin = origin
        self.token = token
        self.verify = verify
        self.max_idle_s = max_idle_s
        self.timeout_s = timeout_s
        self.event_id = f"doctor-{secrets.token_hex(6)}:1"
        self._tls_context()  # a bad --cacert fails here, before any request

    def _tls_context(self) -> ssl.SSLContext:
        """A fresh context per connection (httpx sets its own ALPN list on the one it is given)."""
        try:
            if isinstance(self.verify, str):
                return ssl.create_default_context(cafile=self.verify)
            return httpx.create_ssl_context(verify=self.verify, trust_env=False)
        except (OSError, ssl.SSLError) as exc:
            raise DoctorError(f"cannot load the CA bundle {self.verify!r}: {exc}") from None

    def headers(self) -> dict[str, str]:
        # What a browser's EventSource/fetch sends, compression offer included (the encodings the
        # doctor can decode within a bound, which any compressing proxy also speaks).
        headers = {
            "Accept": "text/event-stream",
            "Accept-Encoding": ACCEPT_ENCODING,
            "Cache-Control": "no-cache",
            "Last-Event-ID": self.event_id,
        }
        if self.origin:
            headers["Origin"] = self.origin
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    @contextlib.asynccontextmanager
    async def _request(
        self, what: str, method: str, limit: float, *, headers: dict[str, str], params: dict[str, str] | None = None
    ) -> AsyncIterator[tuple[httpx.Response, float]]:
        """One request's response, its head read within ``limit`` s, with the event-loop time by
        which its body must be read too. The body is the caller's to read (or not), within that.

        The deadline covers the whole exchange: httpx's own timeouts apply per network read, and a
        server sending a byte per second never trips them (headers, TLS records and bodies alike).
        """
        deadline = asyncio.get_running_loop().time() + limit
        started = time.monotonic()
        client = httpx.AsyncClient(
            verify=self._tls_context(),
            follow_redirects=False,
            trust_env=False,
            timeout=limit + 1,  # a backstop: the deadline ends every exchange first
        )
        try:
            async with client:
                request = client.build_request(method, self.url, params=params, headers=headers)
                try:
                    async with asyncio.timeout_at(deadline):
                        response = await client.send(request, stream=True)
                except TimeoutError:
                    raise DoctorError(
                        f"{what}: no complete response head from {self.url} within {limit:g} s "
                        "(unreachable, or a server trickling its headers; --timeout-s sets the limit)"
                    ) from None
                try:
                    yield response, deadline
                finally:
                    await response.aclose()
        except httpx.HTTPError as exc:
            raise DoctorError(
                f"cannot read {self.url} ({what}): {exc or type(exc).__name__} "
                f"(after {time.monotonic() - started:.1f} s)"
            ) from None

    async def read_stream(self, idle_s: float) -> StreamRead:
        """One diagnostic stream; a cut connection is a result, not an error. A stream still open
        at its deadline, or longer than MAX_STREAM_BYTES, is an error."""
        what = "the idle check's stream" if idle_s else "the diagnostic stream"
        limit = idle_s + self.timeout_s
        started = time.monotonic()
        params = {"idle_s": f"{idle_s:g}"}
        async with self._request(what, "GET", limit, headers=self.headers(), params=params) as (response, deadline):
            if response.status_code != 200:
                error_body = await _error_body(response, deadline)
                return StreamRead(response.status_code, response.headers, [], False, None, error_body)
            decoder = decoder_for(response.headers.get("content-encoding"), MAX_STREAM_BYTES)
            if decoder is None:
                encoding = printable(response.headers.get("content-encoding", ""))
                raise DoctorError(
                    f"{what} arrived with Content-Encoding {encoding!r}, which the doctor did not offer "
                    f"({ACCEPT_ENCODING}) and does not decode: something on the path recodes the event "
                    "stream; exclude text/event-stream from compression"
                )
            frames: list[tuple[float, dict[str, Any]]] = []
            seen = _Seen()
            try:
                async with asyncio.timeout_at(deadline):
                    if await _read_frames(response, decoder, frames, seen, what):
                        return StreamRead(200, response.headers, frames, True, None)
            except TimeoutError:
                raise DoctorError(
                    f"{what} was still open {limit:g} s after the request, without its done frame "
                    f"({seen}): a server or proxy trickling or holding the stream; --timeout-s sets the limit"
                ) from None
            # Silence began when the last frame was sent, FRAMES - 1 intervals after the request:
            # counted from the request, since a buffering proxy delivers the frames only at the cut.
            quiet = time.monotonic() - started - (FRAMES - 1) * FRAME_INTERVAL_S
            return StreamRead(200, response.headers, frames, False, max(0.0, quiet))

    async def idle_check(self, first: StreamRead, report: Report) -> None:
        """A second stream that idles past one heartbeat interval: does the path cut it?"""
        heartbeat, idle = idle_plan(first.headers, self.max_idle_s)
        if idle <= heartbeat:
            report.notes.append(
                f"skipped read-timeout: the heartbeat interval ({heartbeat:g} s) is longer than "
                f"--max-idle-s {self.max_idle_s:g}"
            )
            return
        read = await self.read_stream(idle)
        if read.status != 200:
            raise DoctorError(f"the idle check answered HTTP {read.status}: {read.error_body}")
        check_idle(read, idle, heartbeat, report)

    async def preflight(self) -> httpx.Response:
        """The preflight's status and headers; its body is never read (they are all CORS uses)."""
        assert self.origin is not None
        headers = {
            "Origin": self.origin,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "last-event-id, authorization",
        }
        async with self._request("the CORS preflight", "OPTIONS", self.timeout_s, headers=headers) as (response, _):
            return response

    async def alpn(self) -> str | None:
        """The protocol the server picks when offered h2 and http/1.1 over TLS."""
        parsed = urllib.parse.urlsplit(self.url)
        host = parsed.hostname or ""
        context = self._tls_context()
        context.set_alpn_protocols(["h2", "http/1.1"])
        try:
            async with asyncio.timeout(self.timeout_s):
                _, writer = await asyncio.open_connection(host, parsed.port or 443, ssl=context, server_hostname=host)
        except TimeoutError:
            raise DoctorError(f"TLS handshake with {host} did not finish within {self.timeout_s:g} s") from None
        except OSError as exc:  # ssl.SSLError included
            raise DoctorError(f"TLS handshake with {host} failed: {exc}") from None
        try:
            tls = writer.get_extra_info("ssl_object")
            return tls.selected_alpn_protocol() if isinstance(tls, ssl.SSLObject) else None
        finally:
            writer.transport.abort()  # no TLS close handshake to wait on: the server may never answer it

    async def run(self) -> Report:
        report = Report()
        first = await self.read_stream(0)
        if first.status != 200:
            raise DoctorError(_refusal(self.url, first))
        if not any(frame.get("type") == "diagnostic" for _, frame in first.frames):
            raise DoctorError(
                f"{self.url} answered 200 but sent no diagnostic frame ({len(first.frames)} other frames): "
                f"is a bali-zero-bridge with the diagnostic stream behind this URL, routed like {STREAM_PATH}?"
            )
        check_content_type(first, report)
        check_compression(first, report)
        check_buffering(first, report)
        check_last_event_id(first, self.event_id, report)
        if self.origin:
            check_cors(first, await self.preflight(), self.origin, report)
        if urllib.parse.urlsplit(self.url).scheme != "https":
            check_plain_http(report)
        else:
            check_alpn(await self.alpn(), report)
        await self.idle_check(first, report)
        return report


async def _read_frames(
    response: httpx.Response,
    decoder: BoundedDecoder,
    frames: list[tuple[float, dict[str, Any]]],
    seen: _Seen,
    what: str,
) -> bool:
    """Frames into ``frames`` as they arrive, until done (True) or a cut connection (False)."""
    parser = sse.Parser()
    try:
        async for chunk in response.aiter_raw():  # as received: at most one network read
            now = time.monotonic()
            seen.wire_bytes += len(chunk)
            try:
                text = decoder.decode(chunk)
            except zlib.error as exc:
                raise DoctorError(f"{what} could not be decoded ({seen}): {exc}") from None
            if seen.wire_bytes > MAX_STREAM_BYTES or decoder.exceeded:
                raise DoctorError(f"{what} sent more than {MAX_STREAM_BYTES} bytes without its done frame ({seen})")
            for event in parser.feed(text):
                frame = _json_object(event.data)
                frames.append((now, frame))
                seen.frames += 1
                if frame.get("type") == "done":
                    return True
    except (httpx.RemoteProtocolError, httpx.ReadError):
        pass
    return False


async def _error_body(response: httpx.Response, deadline: float) -> str:
    """The start of a non-200 body, to quote: at most ERROR_BODY_BYTES, read for at most
    ERROR_BODY_S, whatever ``Content-Length`` promised (a body read whole is a server's to size)."""
    loop = asyncio.get_running_loop()
    sample = bytearray()
    with contextlib.suppress(TimeoutError, httpx.HTTPError):
        async with asyncio.timeout_at(min(deadline, loop.time() + ERROR_BODY_S)):
            async for chunk in response.aiter_raw():
                sample += chunk
                if len(sample) >= ERROR_BODY_BYTES:
                    break
    raw = bytes(sample[:ERROR_BODY_BYTES])
    decoder = decoder_for(response.headers.get("content-encoding"), ERROR_BODY_BYTES)
    try:
        body = raw if decoder is None else decoder.decode(raw)
    except zlib.error:
        body = raw
    return printable(body.decode("utf-8", "replace").strip())


def _refusal(url: str, read: StreamRead) -> str:
    if 300 <= read.status < 400:
        location = printable(read.headers.get("location", "nowhere"))
        return (
            f"{url} answered HTTP {read.status} redirecting to {location}: the doctor does not follow "
            "redirects (one would take --token and the checks to another host); run it against the "
            "URL the clients use"
        )
    return (
        f"{url} answered HTTP {read.status} ({read.error_body or 'no body'}): is a bali-zero-bridge "
        f"with the diagnostic stream behind this URL, routed like {STREAM_PATH}? (401: pass --token)"
    )


def _json_object(data: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: a frame of "[[[[..." nested past the stack
        return {}
    return value if isinstance(value, dict) else {}


def add_doctor_command(sub: Any) -> None:
    """Register ``doctor`` on the CLI's subparsers."""
    p = sub.add_parser("doctor", help="check the network path to a bridge for what breaks streaming")
    p.add_argument("url", help="the bridge's public base URL, e.g. https://chat.example.com")
    p.add_argument("--origin", default=None, help="check CORS for a page on this origin")
    p.add_argument("--token", default=None, help="a bearer token, when the bridge has AUTH_REQUIRED=true")
    p.add_argument("--cacert", default=None, help="CA bundle to verify the server's certificate with")
    p.add_argument("--insecure", action="store_true", help="do not verify the server's certificate")
    p.add_argument(
        "--max-idle-s",
        type=float,
        default=60.0,
        help="longest silence the read-timeout check waits (default 60; it needs > HEARTBEAT_INTERVAL_S)",
    )
    p.add_argument(
        "--timeout-s",
        type=float,
        default=REQUEST_TIMEOUT_S,
        help=f"longest any one request may take, body included, beyond the idle check's silence "
        f"(default {REQUEST_TIMEOUT_S:g}, at most {MAX_TIMEOUT_S:g})",
    )


def _say(line: str) -> None:
    print(printable(line, LINE_CHARS), flush=True)


def run_doctor(args: argparse.Namespace) -> int:
    verify: bool | str = False if args.insecure else (args.cacert or True)
    if not 0 < args.max_idle_s <= 600:
        _say("bali-zero-bridge doctor: --max-idle-s must be within 0..600")
        return 2
    if not 0 < args.timeout_s <= MAX_TIMEOUT_S:
        _say(f"bali-zero-bridge doctor: --timeout-s must be within 0..{MAX_TIMEOUT_S:g}")
        return 2
    try:
        doctor = Doctor(
            args.url,
            origin=args.origin,
            token=args.token,
            verify=verify,
            max_idle_s=args.max_idle_s,
            timeout_s=args.timeout_s,
        )
        report = asyncio.run(doctor.run())
    except DoctorError as exc:
        _say(f"ERROR {exc}")
        return 2
    for note in report.notes:
        _say(note)
    for problem in report.problems:
        _say(problem.line())
    return 1 if report.problems else 0
