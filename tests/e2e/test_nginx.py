"""The bridge behind a real nginx rendered from ``deploy/nginx.conf``: frames arrive unbuffered,
heartbeats pass, resume headers reach the bridge, X-Forwarded-For is believed from nginx only.

Every process is real (stub, bridges, nginx); waits are on conditions (events read, log lines),
and timing assertions compare medians with generous bounds so two noisy cores do not flake.
"""

from __future__ import annotations

import itertools
import json
import re
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from bridge.config import Settings
from bridge.server.protocol import WIRE_ALLOWANCE_BYTES
from bridge.sse import Event, Parser
from tests.conftest import BridgeFactory, StubFactory
from tests.support.nginx import (
    TEMPLATE,
    NginxFactory,
    check_config,
    nginx_binary,
    nginx_factory,
    render,
    self_signed_cert,
)
from tests.support.processes import ROOT, Bridge
from tests.support.redis import redis_factory, redis_server
from tests.support.sse_client import STREAM_PATH, open_stream

__all__ = ["nginx_factory", "redis_factory", "redis_server"]  # fixtures used by this module

pytestmark = pytest.mark.nginx

# Settings every bridge here runs with: nginx is the trusted hop, and the limits are out of the way
# (this module measures delivery, not rate limiting).
PROXIED = {
    "TRUSTED_PROXIES": "127.0.0.1/32",
    "RATE_LIMIT": "100000/minute",
    "MAX_STREAMS_PER_USER": "100",
}
STREAM_LOCATION = re.compile(r"location = /api/v2/bali-zero/chat-stream \{(?P<body>[^}]*)\}")
HAS_RESUME_STORE = (ROOT / "bridge" / "resume" / "client.py").exists()


@dataclass
class Timed:
    """A stream read with the monotonic arrival time of every event (t0 = request sent)."""

    status: int
    t0: float
    arrivals: list[tuple[float, Event]] = field(default_factory=list)
    complete: bool = True  # False when the connection ended without the final chunk

    def frames(self) -> list[tuple[float, dict[str, object]]]:
        return [(t, json.loads(e.data)) for t, e in self.arrivals if e.type == "message"]

    def token_times(self) -> list[float]:
        return [t for t, f in self.frames() if f["type"] == "token"]

    def heartbeat_times(self) -> list[float]:
        return [t for t, e in self.arrivals if e.type == "heartbeat"]

    def final(self) -> dict[str, object]:
        return self.frames()[-1][1]


async def timed_stream(
    base_url: str, params: dict[str, str], *, stop_after_tokens: int | None = None, timeout: float = 30
) -> Timed:
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout) as client:
        t0 = time.monotonic()
        async with client.stream("GET", STREAM_PATH, params=params) as response:
            reply = Timed(response.status_code, t0)
            assert response.headers["content-type"].startswith("text/event-stream"), response.headers
            parser = Parser()
            tokens = 0
            try:
                async for chunk in response.aiter_bytes():  # decoded (gzip control)
                    now = time.monotonic()
                    for event in parser.feed(chunk):
                        reply.arrivals.append((now, event))
                        if event.type == "message" and json.loads(event.data)["type"] == "token":
                            tokens += 1
                            if stop_after_tokens is not None and tokens >= stop_after_tokens:
                                return reply
            except httpx.RemoteProtocolError:
                reply.complete = False  # the proxy closed the connection mid-body
            return reply


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(ms|s|m|h)?", value)
    assert match, value
    scale = {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600}[match.group(2)]
    return int(match.group(1)) * scale


def _stream_location(conf: str) -> str:
    match = STREAM_LOCATION.search(conf)
    assert match, "the template has no exact-match location for the stream endpoint"
    return match.group("body")


def _directive(block: str, name: str) -> str:
    values = re.findall(rf"^\s*{name}\s+([^;]+);", block, flags=re.MULTILINE)
    assert len(values) == 1, f"{name}: {values}"
    return str(values[0]).strip()


def _without_comments(conf: str) -> str:
    return "\n".join(line.split("#", 1)[0] for line in conf.splitlines())


@pytest.fixture
def pair(stub_factory: StubFactory, bridge_factory: BridgeFactory) -> Iterator[tuple[Bridge, Bridge]]:
    """Two bridges on one plain echo stub."""
    stub = stub_factory("--mode", "echo", "--echo-delimiter", ",", "--token-delay-ms", "200")
    yield bridge_factory(stub, **PROXIED), bridge_factory(stub, **PROXIED)


# -- the template itself ------------------------------------------------------------------------


def test_rendered_template_passes_nginx_t(tmp_path: Path) -> None:
    binary = nginx_binary()
    (tmp_path / "state").mkdir()
    (tmp_path / "logs").mkdir()
    conf = tmp_path / "nginx.conf"
    cert, key = self_signed_cert(tmp_path)
    conf.write_text(
        render(
            {
                "LISTEN": "127.0.0.1:18080",
                "BRIDGE_A": "127.0.0.1:18001",
                "BRIDGE_B": "127.0.0.1:18002",
                "STATE_DIR": str(tmp_path / "state"),
                "LOG_DIR": str(tmp_path / "logs"),
                "TLS_LISTEN": "127.0.0.1:18443",
                "TLS_CERT": str(cert),
                "TLS_KEY": str(key),
            }
        )
    )
    result = check_config(binary, tmp_path, conf)
    assert result.returncode == 0, result.stderr
    assert "{{" not in conf.read_text()


def test_template_has_the_streaming_directives() -> None:
    """The directives SSE depends on, checked on the file itself (nobody waits 60 s in a test)."""
    conf = _without_comments(TEMPLATE.read_text(encoding="utf-8"))
    stream = _stream_location(conf)
    assert _directive(stream, "proxy_buffering") == "off"
    assert _directive(stream, "proxy_cache") == "off"
    assert _directive(stream, "gzip") == "off"
    read_timeout = _seconds(_directive(stream, "proxy_read_timeout"))
    heartbeat = Settings().heartbeat_interval_s
    assert read_timeout > 60, "nginx's default 60 s would cut streams between two slow heartbeats"
    assert read_timeout >= 3 * heartbeat, "tolerate a couple of late heartbeats"
    assert _seconds(_directive(stream, "send_timeout")) > heartbeat
    assert "text/event-stream" not in conf, "event streams must never be in gzip_types"
    # Server-level request headers; a proxy_set_header in a location would silently drop them all.
    for location in re.findall(r"location [^{]*\{([^}]*)\}", conf):
        assert "proxy_set_header" not in location
    assert re.search(r"^\s*proxy_http_version 1\.1;", conf, re.MULTILINE)
    assert re.search(r'^\s*proxy_set_header Connection "";', conf, re.MULTILINE)
    for header, variable in [
        ("X-Forwarded-For", "$proxy_add_x_forwarded_for"),
        ("Last-Event-ID", "$http_last_event_id"),
        ("X-Connection-ID", "$http_x_connection_id"),
        ("traceparent", "$http_traceparent"),
    ]:
        assert re.search(rf"^\s*proxy_set_header {re.escape(header)} {re.escape(variable)};", conf, re.MULTILINE)
    assert not re.search(r"^\s*(ip_hash|hash|sticky)\b", conf, re.MULTILINE), "no stickiness: resume is the bridge's"


def _bytes(value: str) -> int:
    match = re.fullmatch(r"(\d+)([km])?", value)
    assert match, value
    return int(match.group(1)) * {None: 1, "k": 1024, "m": 1024 * 1024}[match.group(2)]


def test_template_bounds_request_heads_at_the_edge() -> None:
    """nginx bounds a head's time and size itself, with the bridge's own limits: each directive once
    (a second one, e.g. from a merge, would also fail ``nginx -t``)."""
    conf = _without_comments(TEMPLATE.read_text(encoding="utf-8"))
    settings = Settings()
    assert _seconds(_directive(conf, "client_header_timeout")) == settings.header_timeout_s
    count, size = _directive(conf, "large_client_header_buffers").split()
    line_bytes = _bytes(size)
    # A GET whose URL fills MAX_HEADER_BYTES is served by the bridge: its request line fits here too.
    assert line_bytes >= settings.max_header_bytes + len(b"OPTIONS  HTTP/1.1\r\n")
    # And no line is longer than the most the bridge reads of a head.
    assert line_bytes <= settings.max_header_bytes + WIRE_ALLOWANCE_BYTES
    assert int(count) <= 4


def test_template_bounds_request_bodies_and_buffers_them_before_the_bridge() -> None:
    """A trickled body must stop at nginx: it reads whole bodies before forwarding them (request
    buffering is never turned off) and gives up on a silent client no later than the bridge would."""
    conf = _without_comments(TEMPLATE.read_text(encoding="utf-8"))
    assert _seconds(_directive(conf, "client_body_timeout")) <= Settings().body_timeout_s
    assert not re.search(r"^\s*proxy_request_buffering\s+off;", conf, re.MULTILINE)


# -- delivery through nginx ---------------------------------------------------------------------


async def test_first_token_latency_through_nginx_matches_direct(
    pair: tuple[Bridge, Bridge], nginx_factory: NginxFactory
) -> None:
    """The next token comes 200 ms later, so a buffering proxy would show +200 ms here."""
    a, b = pair
    nginx = nginx_factory(a.url, b.url)
    params = {"query": "first,second,third"}

    async def first_token_ms(url: str) -> float:
        reply = await timed_stream(url, params, stop_after_tokens=1)
        assert reply.status == 200
        return (reply.token_times()[0] - reply.t0) * 1000

    for url in (a.url, b.url, nginx.url, nginx.url):  # warm-up: imports, first gRPC calls
        await first_token_ms(url)
    direct: list[float] = []
    proxied: list[float] = []
    for i in range(20):  # interleaved, so load noise hits both series alike
        direct.append(await first_token_ms((a, b)[i % 2].url))
        proxied.append(await first_token_ms(nginx.url))
    d, p = statistics.median(direct), statistics.median(proxied)
    assert p <= d + 15, f"nginx adds {p - d:.1f} ms to first-token latency (direct {d:.1f}, nginx {p:.1f})"
    served = nginx.upstreams()
    assert {addr for addr in served} == {a.url.removeprefix("http://"), b.url.removeprefix("http://")}


async def _paced_gaps(base_url: str) -> list[float]:
    reply = await timed_stream(base_url, {"query": ",".join(f"p{i}" for i in range(12))})
    assert reply.final()["type"] == "done"
    times = reply.token_times()
    assert len(times) == 12
    return [(b - a) * 1000 for a, b in itertools.pairwise(times)]


async def test_paced_tokens_arrive_one_by_one_through_nginx(
    stub_factory: StubFactory, bridge_factory: BridgeFactory, nginx_factory: NginxFactory
) -> None:
    stub = stub_factory("--mode", "echo", "--echo-delimiter", ",", "--token-delay-ms", "50")
    a, b = bridge_factory(stub, **PROXIED), bridge_factory(stub, **PROXIED)
    nginx = nginx_factory(a.url, b.url)
    gaps = await _paced_gaps(nginx.url)
    assert 35 <= statistics.median(gaps) <= 80, gaps
    assert sum(g < 15 for g in gaps) <= 1, f"tokens arrived in batches: {gaps}"


async def test_batching_detector_catches_a_buffering_proxy(
    stub_factory: StubFactory, bridge_factory: BridgeFactory, nginx_factory: NginxFactory
) -> None:
    """Control: the same check fails against a misconfigured nginx (so it can fail).

    Buffering alone does not batch (nginx forwards what it has read whenever the client is
    writable); buffering plus gzip on event streams does: nothing flushes the compressor.
    """
    stub = stub_factory("--mode", "echo", "--echo-delimiter", ",", "--token-delay-ms", "50")
    a, b = bridge_factory(stub, **PROXIED), bridge_factory(stub, **PROXIED)
    template = (
        TEMPLATE.read_text(encoding="utf-8")
        .replace("proxy_buffering off;", "proxy_buffering on; proxy_ignore_headers X-Accel-Buffering;")
        .replace("gzip off;", "gzip on; gzip_types text/event-stream;")
    )
    assert "proxy_ignore_headers" in template and "gzip_types text/event-stream" in template
    nginx = nginx_factory(a.url, b.url, template=template)
    gaps = await _paced_gaps(nginx.url)
    assert sum(g < 15 for g in gaps) >= len(gaps) // 2, f"expected batched arrivals, got {gaps}"


async def test_heartbeats_pass_through_before_the_first_token(
    stub_factory: StubFactory, bridge_factory: BridgeFactory, nginx_factory: NginxFactory
) -> None:
    stub = stub_factory("--mode", "echo", "--first-token-delay-ms", "1200")
    a = bridge_factory(stub, HEARTBEAT_INTERVAL_S="0.2", **PROXIED)
    b = bridge_factory(stub, HEARTBEAT_INTERVAL_S="0.2", **PROXIED)
    nginx = nginx_factory(a.url, b.url)
    reply = await timed_stream(nginx.url, {"query": "late answer"})
    assert reply.final()["type"] == "done"
    first_token = reply.token_times()[0]
    beats = [t for t in reply.heartbeat_times() if t < first_token]
    assert len(beats) >= 3, f"only {len(beats)} heartbeats before the first token"
    assert beats[0] - reply.t0 < 0.8, "the first heartbeat was held back"
    gaps = [y - x for x, y in itertools.pairwise(beats)]
    assert statistics.median(gaps) >= 0.1, f"heartbeats arrived batched: {gaps}"


async def test_heartbeats_keep_a_stream_alive_past_proxy_read_timeout(
    stub_factory: StubFactory, bridge_factory: BridgeFactory, nginx_factory: NginxFactory
) -> None:
    """The 60-second scenario scaled down: proxy_read_timeout 1 s, first token after 2.5 s."""
    stub = stub_factory("--mode", "echo", "--first-token-delay-ms", "2500")
    short = re.sub(r"proxy_read_timeout 180s;", "proxy_read_timeout 1s;", TEMPLATE.read_text(encoding="utf-8"))
    assert "proxy_read_timeout 1s;" in short
    beating = bridge_factory(stub, HEARTBEAT_INTERVAL_S="0.3", **PROXIED)
    alive = await timed_stream(nginx_factory(beating.url, beating.url, template=short).url, {"query": "slow"})
    assert alive.complete and alive.final()["type"] == "done"
    # Control: heartbeats slower than the read timeout → nginx cuts the stream, no final frame.
    silent = bridge_factory(stub, HEARTBEAT_INTERVAL_S="10", **PROXIED)
    cut = await timed_stream(nginx_factory(silent.url, silent.url, template=short).url, {"query": "slow"})
    assert not cut.complete or all(f["type"] not in ("done", "error") for _, f in cut.frames())


async def test_a_dead_instance_is_skipped(
    stub_factory: StubFactory, bridge_factory: BridgeFactory, nginx_factory: NginxFactory
) -> None:
    """A crashed bridge: its refused connections are retried on the other (proxy_next_upstream)."""
    stub = stub_factory("--mode", "echo")
    a, b = bridge_factory(stub, **PROXIED), bridge_factory(stub, **PROXIED)
    nginx = nginx_factory(a.url, b.url)
    a.kill()
    for _ in range(6):
        reply = await open_stream(nginx.url, params={"query": "still here"})
        assert reply.status == 200 and reply.frames[-1]["type"] == "done", (reply.status, reply.body)
    dead = a.url.removeprefix("http://")
    tried = nginx.upstreams()
    assert any(dead in addr for addr in tried), f"nginx never tried the dead instance: {tried}"
    assert sum(dead in addr for addr in tried) <= 2, f"max_fails did not take it out: {tried}"


# -- headers reach the bridge -------------------------------------------------------------------


async def test_last_event_id_resumes_through_nginx(
    stub_factory: StubFactory, bridge_factory: BridgeFactory, nginx_factory: NginxFactory
) -> None:
    stub = stub_factory("--mode", "echo", "--echo-delimiter", ",", "--token-delay-ms", "5")
    bridge = bridge_factory(stub, RESUME_GRACE_S="10", **PROXIED)
    nginx = nginx_factory(bridge.url, bridge.url)  # one instance: resume stays in its memory
    query = ",".join(f"t{i}" for i in range(200))
    first = await open_stream(nginx.url, params={"query": query}, stop_after_tokens=10)
    assert first.tokens() == [f"t{i}" for i in range(10)]
    second = await open_stream(
        nginx.url, params={"query": query}, headers={"Last-Event-ID": first.events[-1].last_event_id}
    )
    assert second.status == 200
    assert second.tokens() == [f"t{i}" for i in range(10, 200)], "no duplicates, no gaps"
    assert second.frames[-1]["type"] == "done"
    # The x-connection-id + numeric Last-Event-ID form (clients that keep the id themselves).
    third = await open_stream(nginx.url, params={"query": query}, stop_after_tokens=5)
    stream_id, seq = third.events[-1].last_event_id.rsplit(":", 1)
    fourth = await open_stream(
        nginx.url, params={"query": query}, headers={"x-connection-id": stream_id, "Last-Event-ID": seq}
    )
    assert fourth.tokens() == [f"t{i}" for i in range(5, 200)]


async def test_x_forwarded_for_from_nginx_is_the_rate_limit_key(
    stub_factory: StubFactory, bridge_factory: BridgeFactory, nginx_factory: NginxFactory
) -> None:
    """nginx appends the peer; the bridge (trusting 127.0.0.1) keys limits on the client address."""
    stub = stub_factory("--mode", "echo")
    bridge = bridge_factory(stub, TRUSTED_PROXIES="127.0.0.1/32", RATE_LIMIT="1/minute")
    nginx = nginx_factory(bridge.url, bridge.url)
    async with httpx.AsyncClient(base_url=nginx.url) as client:

        async def ask(ip: str) -> int:
            r = await client.post("/api/v2/bali-zero/chat", json={"query": "hello"}, headers={"X-Forwarded-For": ip})
            return r.status_code

        assert await ask("203.0.113.7") == 200
        assert await ask("203.0.113.7") == 429
        assert await ask("203.0.113.8") == 200, "a different client behind nginx has its own limit"


def test_20kib_header_the_bridge_accepts_passes_nginx_and_a_40kib_one_is_refused_at_the_edge(
    bridge_factory: BridgeFactory, nginx_factory: NginxFactory
) -> None:
    """nginx's default ``large_client_header_buffers`` (4 8k) answered 400 to a header the bridge
    accepts (a large cookie or token); the template's lets through what the bridge accepts, leaves a
    head over MAX_HEADER_BYTES to the bridge's JSON 431, and refuses a longer line itself."""
    bridge = bridge_factory(**PROXIED)
    nginx = nginx_factory(bridge.url, bridge.url)
    kib = 1024
    with httpx.Client(base_url=nginx.url, timeout=10) as client:
        assert client.get("/healthz", headers={"X-Big": "b" * (20 * kib)}).status_code == 200
        over_the_bridge = client.get("/healthz", headers={"X-A": "a" * (20 * kib), "X-B": "b" * (20 * kib)})
        assert over_the_bridge.status_code == 431
        assert over_the_bridge.json()["error"]["code"] == "HEADERS_TOO_LARGE"
        over_the_edge = client.get("/healthz", headers={"X-Big": "b" * (40 * kib)})
        assert over_the_edge.status_code == 400
        assert "application/json" not in over_the_edge.headers.get("content-type", ""), "nginx's own page"


# -- across instances ---------------------------------------------------------------------------


@pytest.mark.redis
@pytest.mark.skipif(not HAS_RESUME_STORE, reason="bridge/resume/ (RESUME_STORE=redis) is not built yet")
async def test_resume_across_instances_through_nginx(
    stub_factory: StubFactory, bridge_factory: BridgeFactory, nginx_factory: NginxFactory, redis_server: str
) -> None:
    """Each reconnect may land on the other instance (no stickiness); the stream still continues."""
    stub = stub_factory("--mode", "echo", "--echo-delimiter", ",", "--token-delay-ms", "10")
    env = {**PROXIED, "RESUME_GRACE_S": "10", "RESUME_STORE": redis_server}
    a, b = bridge_factory(stub, **env), bridge_factory(stub, **env)
    nginx = nginx_factory(a.url, b.url)
    query = ",".join(f"r{i}" for i in range(150))
    tokens: list[str] = []
    last_id = ""
    for hop in range(4):  # three reconnects: least_conn alternates idle instances
        headers = {"Last-Event-ID": last_id} if last_id else {}
        reply = await open_stream(
            nginx.url, params={"query": query}, headers=headers, stop_after_tokens=None if hop == 3 else 10
        )
        assert reply.status == 200, reply.body
        tokens += reply.tokens()
        last_id = reply.events[-1].last_event_id
    assert tokens == [f"r{i}" for i in range(150)], "no duplicates, no gaps across instances"
    assert reply.frames[-1]["type"] == "done"
    served = [addr for addr in nginx.upstreams() if addr != "-"]
    assert len(set(served)) == 2, f"every hop landed on one instance, nothing was tested: {served}"
