"""``bali-zero-bridge doctor`` and the diagnostic stream it reads, against real nginx and bridges.

Through deploy/nginx.conf's TLS + HTTP/2 listener the doctor finds nothing wrong; through a
deliberately broken nginx (buffering on and honouring no X-Accel-Buffering, gzip on event
streams, a 5 s read timeout under an 8 s heartbeat, Last-Event-ID dropped, HTTP/1.1 only) it
names each problem with its fix. The diagnostic endpoint itself is gated, bounded and needs no
RAG service.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from bridge.doctor.probe import _diagnostic_url
from bridge.doctor.stream import echoed_event_id, max_idle_s, parse_idle
from bridge.errors import BadRequest, DoctorError
from tests.conftest import BridgeFactory, StubFactory
from tests.support.nginx import TEMPLATE, NginxFactory, nginx_factory  # noqa: F401 (fixture)
from tests.support.processes import ROOT, base_env

DIAGNOSTIC = "/api/v2/bali-zero/chat-stream/diagnostic"
ORIGIN = "https://app.example"
PROXIED = {"TRUSTED_PROXIES": "127.0.0.1/32", "CORS_ORIGINS": ORIGIN, "RATE_LIMIT": "1000/minute"}


def doctor(*args: str, timeout: float = 90) -> tuple[int, list[str], float]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "doctor", *args],
        cwd=ROOT,
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stdout.splitlines(), time.monotonic() - started


def _location(conf: str, path: str) -> list[str]:
    match = re.search(rf"location = {re.escape(path)} \{{(?P<body>.*?)\n        \}}", conf, re.DOTALL)
    assert match, path
    return [line.split("#", 1)[0].strip() for line in match.group("body").splitlines() if line.split("#", 1)[0].strip()]


# -- unit: the pure pieces ------------------------------------------------------------------------


def test_diagnostic_location_has_exactly_the_stream_locations_directives() -> None:
    """Otherwise the doctor would test a path real streams do not take."""
    conf = TEMPLATE.read_text(encoding="utf-8")
    assert _location(conf, DIAGNOSTIC) == _location(conf, "/api/v2/bali-zero/chat-stream")


@pytest.mark.parametrize("raw", ["-1", "nan", "inf", "36", "abc", "1e308"])
def test_idle_outside_heartbeat_plus_margin_is_refused(raw: str) -> None:
    with pytest.raises(BadRequest):
        parse_idle(raw, 30.0)


def test_idle_bounds() -> None:
    assert parse_idle(None, 30.0) == 0.0 and parse_idle("", 30.0) == 0.0
    assert parse_idle(str(max_idle_s(30.0)), 30.0) == 35.0


@pytest.mark.parametrize("hostile", ["a\nid: 9", "x\r\ndata: injected", "a" * 65, "é", "a b"])
def test_hostile_last_event_id_is_not_echoed_into_the_stream(hostile: str) -> None:
    assert echoed_event_id(hostile) == "(not a plain id)"
    assert echoed_event_id("doctor-ab12:1") == "doctor-ab12:1" and echoed_event_id(None) is None


def test_doctor_url_accepts_a_base_or_the_stream_url() -> None:
    want = "https://h.example/chat" + DIAGNOSTIC
    assert _diagnostic_url("https://h.example/chat/") == want
    assert _diagnostic_url("https://h.example/chat/api/v2/bali-zero/chat-stream") == want
    with pytest.raises(DoctorError):
        _diagnostic_url("ftp://h.example")


# -- the endpoint ---------------------------------------------------------------------------------


def test_connection_pinning_through_diagnostic_streams_is_capped_per_user(bridge_factory: BridgeFactory) -> None:
    """An attacker opening diagnostic streams to hold connections gets MAX_STREAMS_PER_USER, then 429.

    No stub at all (RAG_TARGET points nowhere): the diagnostic stream never calls the RAG service.
    """
    bridge = bridge_factory(None, RAG_TARGET="127.0.0.1:9", MAX_STREAMS_PER_USER="1", HEARTBEAT_INTERVAL_S="1")
    with httpx.Client(base_url=bridge.url, timeout=20) as http:
        with http.stream("GET", DIAGNOSTIC, params={"idle_s": "2"}) as held:
            assert held.status_code == 200
            chunks = held.iter_bytes()  # kept: a dropped iterator would close the connection
            first = next(chunks)  # the first frame: the slot is taken
            second = http.get(DIAGNOSTIC)
            assert second.status_code == 429 and second.json()["error"]["code"] == "TOO_MANY_STREAMS"
            body = first + b"".join(chunks)
        assert body.count(b'data: {"type":"diagnostic"') == 10 and body.endswith(b"\n\n")
        assert b'"type":"done"' in body
        assert http.get(DIAGNOSTIC).status_code == 200  # released when it ended


def test_connection_pinning_through_a_long_diagnostic_idle_is_refused(bridge_factory: BridgeFactory) -> None:
    """``idle_s`` beyond HEARTBEAT_INTERVAL_S + 5 (or not a finite number) is a 400, not a long hold."""
    bridge = bridge_factory(None, RAG_TARGET="127.0.0.1:9", HEARTBEAT_INTERVAL_S="1")
    with httpx.Client(base_url=bridge.url, timeout=20) as http:
        for idle in ("7", "1e9", "inf", "nan", "-1"):
            refused = http.get(DIAGNOSTIC, params={"idle_s": idle})
            assert refused.status_code == 400 and refused.json()["error"]["code"] == "INVALID_REQUEST", idle


def test_diagnostic_stream_counts_against_the_rate_limit(bridge_factory: BridgeFactory) -> None:
    bridge = bridge_factory(None, RAG_TARGET="127.0.0.1:9", RATE_LIMIT="2/minute")
    with httpx.Client(base_url=bridge.url, timeout=20) as http:
        assert http.head(DIAGNOSTIC).status_code == 405  # HEAD spends no slot (it would run in full)
        assert [http.get(DIAGNOSTIC).status_code for _ in range(3)] == [200, 200, 429]


# -- the doctor through real nginx ----------------------------------------------------------------


def test_doctor_passes_through_deploy_nginx_conf(
    stub_factory: StubFactory,
    bridge_factory: BridgeFactory,
    nginx_factory: NginxFactory,  # noqa: F811
) -> None:
    stub = stub_factory("--mode", "echo")
    a = bridge_factory(stub, HEARTBEAT_INTERVAL_S="3", **PROXIED)
    b = bridge_factory(stub, HEARTBEAT_INTERVAL_S="3", **PROXIED)
    nginx = nginx_factory(a.url, b.url)
    assert nginx.tls_url is not None and nginx.cert is not None
    code, lines, took = doctor(nginx.tls_url, "--cacert", str(nginx.cert), "--origin", ORIGIN)
    assert code == 0, lines
    names = {line.split(":", 1)[0] for line in lines}
    assert names == {"ok compression", "ok buffering", "ok last-event-id", "ok cors", "ok http2", "ok read-timeout"}
    assert took < 3 + 2 + 15, took  # heartbeat + margin, plus the quick checks


def test_doctor_names_each_problem_of_a_broken_nginx(
    stub_factory: StubFactory,
    bridge_factory: BridgeFactory,
    nginx_factory: NginxFactory,  # noqa: F811
) -> None:
    stub = stub_factory("--mode", "echo")
    a = bridge_factory(stub, HEARTBEAT_INTERVAL_S="8", **PROXIED)
    b = bridge_factory(stub, HEARTBEAT_INTERVAL_S="8", **PROXIED)
    broken = (
        TEMPLATE.read_text(encoding="utf-8")
        .replace("proxy_buffering off;", "proxy_buffering on; proxy_ignore_headers X-Accel-Buffering;")
        .replace("gzip off;", "gzip on; gzip_types text/event-stream;")
        .replace("proxy_read_timeout 180s;", "proxy_read_timeout 5s;")
        .replace("proxy_set_header Last-Event-ID $http_last_event_id;", 'proxy_set_header Last-Event-ID "";')
        .replace("ssl http2;", "ssl;")
    )
    for change in (
        "proxy_buffering on;",
        "gzip_types text/event-stream;",
        "proxy_read_timeout 5s;",
        'Last-Event-ID "";',
        "ssl;",
    ):
        assert change in broken, change
    nginx = nginx_factory(a.url, b.url, template=broken)
    assert nginx.tls_url is not None
    code, lines, took = doctor(nginx.tls_url, "--insecure", "--origin", "https://elsewhere.example")
    assert code == 1, lines
    problems = {line.split(":", 1)[0].removeprefix("PROBLEM "): line for line in lines if line.startswith("PROBLEM")}
    assert set(problems) == {"buffering", "compression", "read-timeout", "http2", "last-event-id", "cors"}, lines
    assert "proxy_buffering off" in problems["buffering"]
    assert "gzip" in problems["compression"]
    cut = re.search(r"cut about (\d+) s into a silence", problems["read-timeout"])
    assert cut and 4 <= int(cut.group(1)) <= 6, problems["read-timeout"]  # proxy_read_timeout 5s
    assert "proxy_read_timeout" in problems["read-timeout"]
    assert "six connections" in problems["http2"] and "http2" in problems["http2"].split("Fix:")[1]
    assert "$http_last_event_id" in problems["last-event-id"]
    assert "CORS_ORIGINS" in problems["cors"]
    assert took < 8 + 2 + 15, took


def test_doctor_on_something_that_is_not_a_bridge_says_so(tmp_path: Path) -> None:
    code, lines, _ = doctor("http://127.0.0.1:9/")
    assert code == 2 and len(lines) == 1 and lines[0].startswith("ERROR cannot read"), lines
