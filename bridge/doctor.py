"""``bali-zero-bridge doctor URL``: what the network path to a bridge does to Server-Sent Events.

Run it where the clients are (or as close as you can get); it reads the bridge's diagnostic
stream (bridge/diagnostics.py) through whatever proxies sit in between and names each problem
with its fix:

* buffering: ten frames sent 100 ms apart must arrive apart, not in one batch;
* compression: a ``Content-Encoding`` on ``text/event-stream`` (compressors hold frames back);
* a proxy read timeout shorter than the heartbeat: the stream idles a little longer than
  ``HEARTBEAT_INTERVAL_S`` and must not be cut;
* HTTP/1.1 only: browsers then open at most six connections per origin, so the seventh open
  stream waits (ALPN is asked for ``h2`` when the URL is https);
* ``Last-Event-ID`` not forwarded: resume after a dropped connection would restart the answer;
* CORS for ``--origin``: the preflight and the stream must allow that page's origin.

Exit status 0 when nothing is wrong, 1 with one ``PROBLEM`` line per finding, 2 when the check
itself could not run (unreachable, not a bridge). The runtime is bounded: the idle check lasts at
most ``--max-idle-s`` (default 60 s) and every request and read is cut to what is left of a
budget of ``--max-idle-s`` + 45 s, so no server can hold it longer; usually it takes
HEARTBEAT_INTERVAL_S + 5 s.
"""

from __future__ import annotations

import argparse
import json
import secrets
import socket
import ssl
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from bridge import sse
from bridge.diagnostics import FRAME_INTERVAL_S, FRAMES
from bridge.doctor_checks import (
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

DIAGNOSTIC_PATH = "/api/v2/bali-zero/chat-stream/diagnostic"
STREAM_PATH = "/api/v2/bali-zero/chat-stream"
REQUEST_TIMEOUT_S = 10.0
# Everything but the idle check fits in this; with it, the run never exceeds --max-idle-s + this,
# even against a server that trickles bytes to keep it waiting.
BUDGET_BEYOND_IDLE_S = 45.0
# A hostile or broken server must not make the doctor hold unbounded bytes.
MAX_STREAM_BYTES = 256 * 1024


class DoctorError(Exception):
    """The check itself could not run (exit 2): the message says what to look at."""


def _diagnostic_url(base: str) -> str:
    parsed = urllib.parse.urlsplit(base)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise DoctorError(f"{base!r} is not an http(s) URL of a bridge (e.g. https://chat.example.com)")
    path = parsed.path.rstrip("/")
    for suffix in (DIAGNOSTIC_PATH, STREAM_PATH):
        path = path.removesuffix(suffix)
    return urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, path + DIAGNOSTIC_PATH, "", ""))


class Doctor:
    """The runner: reads the diagnostic stream (and preflight, TLS) within one time budget and
    hands what it saw to the checks in bridge/doctor_checks.py."""

    def __init__(
        self, url: str, *, origin: str | None, token: str | None, verify: bool | str, max_idle_s: float
    ) -> None:
        self.url = _diagnostic_url(url)
        self.origin = origin
        self.token = token
        self.verify = verify
        self.max_idle_s = max_idle_s
        self.event_id = f"doctor-{secrets.token_hex(6)}:1"
        self.deadline = time.monotonic() + max_idle_s + BUDGET_BEYOND_IDLE_S

    def budget(self, cap: float) -> float:
        """``cap`` seconds, or what is left of the run's time budget if that is less."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DoctorError(f"gave up: the checks took longer than --max-idle-s + {BUDGET_BEYOND_IDLE_S:g} s")
        return min(cap, left)

    def headers(self) -> dict[str, str]:
        # What a browser's EventSource/fetch sends, compression offer included.
        headers = {
            "Accept": "text/event-stream",
            "Accept-Encoding": "gzip, deflate, br",
            "Cache-Control": "no-cache",
            "Last-Event-ID": self.event_id,
        }
        if self.origin:
            headers["Origin"] = self.origin
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    @contextmanager
    def _client(self, read_timeout: float) -> Iterator[httpx.Client]:
        timeout = httpx.Timeout(self.budget(REQUEST_TIMEOUT_S), read=self.budget(read_timeout))
        with httpx.Client(timeout=timeout, verify=self.verify, follow_redirects=False, trust_env=False) as client:
            yield client

    def read_stream(self, idle_s: float) -> StreamRead:
        """One diagnostic stream; a cut connection is a result, not an error."""
        started = time.monotonic()
        frames: list[tuple[float, dict[str, Any]]] = []
        try:
            with (
                self._client(read_timeout=idle_s + REQUEST_TIMEOUT_S) as client,
                client.stream("GET", self.url, params={"idle_s": f"{idle_s:g}"}, headers=self.headers()) as response,
            ):
                if response.status_code != 200:
                    body = response.read()[:2000].decode("utf-8", "replace")
                    return StreamRead(response.status_code, response.headers, [], False, None, body)
                parser = sse.Parser()
                received = 0
                try:
                    for chunk in response.iter_bytes():
                        now = time.monotonic()
                        received += len(chunk)
                        self.budget(0)  # raises once the run's time is up
                        if received > MAX_STREAM_BYTES:
                            raise DoctorError(f"the diagnostic stream sent more than {MAX_STREAM_BYTES} bytes")
                        for event in parser.feed(chunk):
                            frame = _json_object(event.data)
                            frames.append((now, frame))
                            if frame.get("type") == "done":
                                return StreamRead(200, response.headers, frames, True, None)
                except (httpx.RemoteProtocolError, httpx.ReadError, httpx.ReadTimeout):
                    pass
                # Silence began when the last frame was sent, ~0.9 s after the request: measured
                # from the request, since a buffering proxy delivers the frames only at the cut.
                quiet = time.monotonic() - started - (FRAMES - 1) * FRAME_INTERVAL_S
                return StreamRead(200, response.headers, frames, False, max(0.0, quiet))
        except httpx.HTTPError as exc:
            raise DoctorError(
                f"cannot read {self.url}: {exc or type(exc).__name__} (after {time.monotonic() - started:.1f} s)"
            ) from None

    def idle_check(self, first: StreamRead, report: Report) -> None:
        """A second stream that idles past one heartbeat interval: does the path cut it?"""
        heartbeat, idle = idle_plan(first.headers, self.max_idle_s)
        if idle <= heartbeat:
            report.notes.append(
                f"skipped read-timeout: the heartbeat interval ({heartbeat:g} s) is longer than "
                f"--max-idle-s {self.max_idle_s:g}"
            )
            return
        read = self.read_stream(idle)
        if read.status != 200:
            raise DoctorError(f"the idle check answered HTTP {read.status}: {read.error_body.strip()[:200]}")
        check_idle(read, idle, heartbeat, report)

    def preflight(self) -> httpx.Response:
        assert self.origin is not None
        headers = {
            "Origin": self.origin,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "last-event-id, authorization",
        }
        try:
            with self._client(REQUEST_TIMEOUT_S) as client:
                return client.options(self.url, headers=headers)
        except httpx.HTTPError as exc:
            raise DoctorError(f"CORS preflight to {self.url} failed: {exc or type(exc).__name__}") from None

    def alpn(self) -> str | None:
        """The protocol the server picks when offered h2 and http/1.1 over TLS."""
        parsed = urllib.parse.urlsplit(self.url)
        context = ssl.create_default_context()
        if self.verify is False:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        elif isinstance(self.verify, str):
            context.load_verify_locations(self.verify)
        context.set_alpn_protocols(["h2", "http/1.1"])
        host = parsed.hostname or ""
        try:
            with (
                socket.create_connection((host, parsed.port or 443), timeout=self.budget(REQUEST_TIMEOUT_S)) as raw,
                context.wrap_socket(raw, server_hostname=host) as tls,
            ):
                return tls.selected_alpn_protocol()
        except (OSError, ssl.SSLError) as exc:
            raise DoctorError(f"TLS handshake with {host} failed: {exc}") from None

    def run(self) -> Report:
        report = Report()
        first = self.read_stream(0)
        if first.status != 200:
            raise DoctorError(
                f"{self.url} answered HTTP {first.status} ({first.error_body.strip()[:200] or 'no body'}): "
                "is a bali-zero-bridge with the diagnostic stream behind this URL, routed like "
                f"{STREAM_PATH}? (401: pass --token)"
            )
        check_content_type(first, report)
        check_compression(first, report)
        check_buffering(first, report)
        check_last_event_id(first, self.event_id, report)
        if self.origin:
            check_cors(first, self.preflight(), self.origin, report)
        if urllib.parse.urlsplit(self.url).scheme != "https":
            check_plain_http(report)
        else:
            check_alpn(self.alpn(), report)
        self.idle_check(first, report)
        return report


def _json_object(data: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError:
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


def run_doctor(args: argparse.Namespace) -> int:
    verify: bool | str = False if args.insecure else (args.cacert or True)
    if not 0 < args.max_idle_s <= 600:
        print("bali-zero-bridge doctor: --max-idle-s must be within 0..600", flush=True)
        return 2
    try:
        doctor = Doctor(args.url, origin=args.origin, token=args.token, verify=verify, max_idle_s=args.max_idle_s)
        report = doctor.run()
    except DoctorError as exc:
        print(f"ERROR {exc}", flush=True)
        return 2
    for note in report.notes:
        print(note, flush=True)
    for problem in report.problems:
        print(problem.line(), flush=True)
    return 1 if report.problems else 0
