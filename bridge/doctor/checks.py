"""The verdicts of ``bali-zero-bridge doctor``: what it saw → ``PROBLEM`` lines with their fixes.

Pure functions over what the runner (bridge/doctor/probe.py) read from the network, kept apart from the
HTTP and TLS probing so each check can be read, changed and tested without a server, and so the
runner alone decides what is fetched and within which time budget (no check can start a request
that outlives the run's deadline).
"""

from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

import httpx

# Frames leave 100 ms apart; a gap under half that means they were held and released together.
APART_S = 0.05
DEFAULT_HEARTBEAT_S = 30.0
# How much longer than one heartbeat interval the idle check waits: a heartbeat is written after
# HEARTBEAT_INTERVAL_S of silence, so a proxy must tolerate at least that plus a little.
IDLE_BEYOND_HEARTBEAT_S = 2.0


@dataclass(frozen=True, slots=True)
class Problem:
    name: str
    what: str
    fix: str

    def line(self) -> str:
        return f"PROBLEM {self.name}: {self.what}. Fix: {self.fix}"


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def ok(self, name: str, what: str) -> None:
        self.notes.append(f"ok {name}: {what}")

    def problem(self, name: str, what: str, fix: str) -> None:
        self.problems.append(Problem(name, what, fix))


@dataclass
class StreamRead:
    """One diagnostic stream as the doctor saw it."""

    status: int
    headers: httpx.Headers
    frames: list[tuple[float, dict[str, Any]]]  # (arrival, frame) in order
    complete: bool  # the done frame arrived
    cut_after_s: float | None  # seconds of silence before the connection ended without done
    error_body: str = ""


def check_content_type(read: StreamRead, report: Report) -> None:
    content_type = read.headers.get("content-type", "")
    if not content_type.startswith("text/event-stream"):
        report.problem(
            "content-type",
            f"the stream arrived as {content_type or 'no Content-Type'!r}",
            "let the proxy pass the bridge's text/event-stream response unchanged",
        )


def check_compression(read: StreamRead, report: Report) -> None:
    encoding = read.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        report.problem(
            "compression",
            f"the event stream arrived with Content-Encoding: {encoding}; a "
            "compressor holds frames back until its block fills",
            "exclude text/event-stream from compression (nginx: gzip off in the stream location, "
            "no text/event-stream in gzip_types)",
        )
    else:
        report.ok("compression", "none on text/event-stream")


def check_buffering(read: StreamRead, report: Report) -> None:
    arrivals = [t for t, frame in read.frames if frame.get("type") == "diagnostic"]
    if len(arrivals) < 2:
        report.problem(
            "buffering",
            f"only {len(arrivals)} diagnostic frames arrived",
            "let the proxy pass the stream through unbuffered (nginx: proxy_buffering off)",
        )
        return
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    apart = sum(g >= APART_S for g in gaps)
    median_ms = statistics.median(gaps) * 1000
    if apart * 2 < len(gaps):
        report.problem(
            "buffering",
            f"frames sent 100 ms apart arrived together ({apart} of {len(gaps)} gaps "
            f">= {APART_S * 1000:.0f} ms, median {median_ms:.0f} ms): tokens would arrive in batches",
            "turn off response buffering and compression for the stream path "
            "(nginx: proxy_buffering off; gzip off; or honour X-Accel-Buffering: no)",
        )
    else:
        report.ok("buffering", f"frames arrived apart (median gap {median_ms:.0f} ms)")


def check_last_event_id(read: StreamRead, sent_id: str, report: Report) -> None:
    """``sent_id``: the Last-Event-ID the doctor sent; the bridge echoes what it received."""
    first = next((f for _, f in read.frames if f.get("seq") == 0), None)
    received = None if first is None else first.get("last_event_id")
    if received != sent_id:
        seen = "no Last-Event-ID" if received is None else f"Last-Event-ID {received!r}"
        report.problem(
            "last-event-id",
            f"the bridge received {seen} (sent {sent_id!r}): a "
            "reconnecting client would restart its answer instead of resuming",
            "forward the Last-Event-ID request header (nginx: proxy_set_header Last-Event-ID $http_last_event_id)",
        )
    else:
        report.ok("last-event-id", "forwarded")


def check_cors(read: StreamRead, preflight: httpx.Response, origin: str, report: Report) -> None:
    allowed = read.headers.get("access-control-allow-origin")
    pre_allowed = preflight.headers.get("access-control-allow-origin")
    pre_headers = preflight.headers.get("access-control-allow-headers", "").lower()
    if allowed not in (origin, "*") or preflight.status_code >= 400 or pre_allowed not in (origin, "*"):
        report.problem(
            "cors",
            f"a page on {origin} may not read the stream (preflight HTTP {preflight.status_code}, "
            f"Access-Control-Allow-Origin {pre_allowed!r} / {allowed!r})",
            f"add {origin} to the bridge's CORS_ORIGINS (and let the proxy pass OPTIONS and the "
            "Access-Control-* headers)",
        )
    elif "last-event-id" not in pre_headers and pre_headers != "*":
        report.problem(
            "cors",
            f"the preflight for {origin} does not allow the Last-Event-ID header",
            "let the proxy pass the bridge's Access-Control-Allow-Headers unchanged",
        )
    else:
        report.ok("cors", f"{origin} allowed")


def check_plain_http(report: Report) -> None:
    report.problem(
        "http2",
        "plain http: browsers speak HTTP/2 only over TLS, so a page gets at most six "
        "connections per origin and a seventh open stream (tab) waits",
        "serve the bridge over https with HTTP/2 (nginx: listen 443 ssl http2)",
    )


def check_alpn(protocol: str | None, report: Report) -> None:
    """``protocol``: what the server chose when offered h2 and http/1.1 over TLS."""
    if protocol != "h2":
        report.problem(
            "http2",
            f"HTTP/1.1 only (ALPN chose {protocol or 'nothing'}): browsers open at most six "
            "connections per origin, so a seventh open stream (tab) waits",
            "enable HTTP/2 on the TLS listener (nginx: listen 443 ssl http2)",
        )
    else:
        report.ok("http2", "ALPN h2")


def idle_plan(headers: httpx.Headers, max_idle_s: float) -> tuple[float, float]:
    """(heartbeat interval the bridge announced, silence to test); the check is skipped when the
    silence does not exceed the heartbeat (then it could not tell a cut from a heartbeat).

    The header is the server's: anything but a positive finite number counts as absent (a "nan"
    would become the idle stream's deadline, a negative one a request for no silence).
    """
    raw = headers.get("x-heartbeat-interval")
    try:
        heartbeat = float(raw) if raw else DEFAULT_HEARTBEAT_S
    except ValueError:
        heartbeat = DEFAULT_HEARTBEAT_S
    if not (math.isfinite(heartbeat) and heartbeat > 0):
        heartbeat = DEFAULT_HEARTBEAT_S
    return heartbeat, min(heartbeat + IDLE_BEYOND_HEARTBEAT_S, max_idle_s)


def check_idle(read: StreamRead, idle: float, heartbeat: float, report: Report) -> None:
    if read.complete:
        report.ok("read-timeout", f"{idle:g} s of silence passed (heartbeat every {heartbeat:g} s)")
        return
    cut = read.cut_after_s or 0.0
    report.problem(
        "read-timeout",
        f"the connection was cut about {cut:.0f} s into a silence, but the bridge sends a "
        f"heartbeat only every {heartbeat:g} s: slow answers would be cut",
        "raise the proxy's read timeout well above HEARTBEAT_INTERVAL_S (nginx: proxy_read_timeout "
        "180s), or lower HEARTBEAT_INTERVAL_S below it",
    )
