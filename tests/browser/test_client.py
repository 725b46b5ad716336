"""The browser client and the demo page in a real headless Chromium against the real bridge and stub.

Every test drives the shipped files (bridge/static/*) as served by the bridge: GET goes through
Chromium's own EventSource, POST through fetch and the client's streaming parser.
"""

from __future__ import annotations

import itertools
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.browser import console_collector, launch_chromium
from tests.support.processes import Bridge, Stub, base_env

pytestmark = pytest.mark.browser

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
DELIM = "\u241e"  # the stub splits the echoed query at this character, so tokens are exact
STREAM_PATH = "/api/v2/bali-zero/chat-stream"

# SSE-EDGE-CASES.md, "Token payloads every test suite should push through end to end".
PAYLOADS: dict[str, str] = {
    "LF": "\n",
    "CRLF": "\r\n",
    "lone-CR": "\r",
    "data-injected": "data: injected",
    "id-injection": "\nid: 9\n\n",
    "leading-space": " leading space",
    "empty": "",
    "U+2028-U+2029": "\u2028 \u2029",
    "NUL": "\x00",
    "ZWJ-family": "👩\u200d👩\u200d👧",
    "combining": "e\u0301",
    "precomposed": "é",
    "RTL": "مرحبا بالعالم · שלום עולם",
}
_UNIT = "é\r\n👩\u200d👩\u200d👧 ab\u2028"
BIG = _UNIT * (65536 // len(_UNIT.encode()))
BIG += "x" * (65536 - len(BIG.encode()))  # exactly 64 KiB of UTF-8
PAYLOADS["64KiB"] = BIG
# A URL cannot carry 64 KiB of percent-encoded text (uvicorn refuses request lines over ~64 KiB with a
# plain-text 400), so GET gets the largest token a URL can hold and the 64 KiB token goes by POST.
GET_MAX = _UNIT * (16384 // len(_UNIT.encode()))
TEN_THOUSAND = [chr(0x61 + i % 26) for i in range(10_000)]

# Runs one stream in the page with the shipped client and records everything it reports.
RUN_STREAM = """
async ({query, method, options, background}) => {
  const log = {tokens: [], states: [], reconnects: [], errors: [], resets: 0, heartbeats: 0, metadata: null};
  const client = new BaliZeroStreamClient({
    baseUrl: '/api/v2/bali-zero/chat-stream',
    random: () => 0.999,
    ...options,
    onToken: (t) => log.tokens.push(t),
    onStateChange: (s) => log.states.push(s),
    onReconnect: (r) => log.reconnects.push({attempt: r.attempt, delayMs: r.delayMs, code: r.error.code,
                                             status: r.error.status, at: performance.now()}),
    onError: (e) => log.errors.push({code: e.code, status: e.status, retryAfterMs: e.retryAfterMs,
                                     message: e.message, retryable: e.retryable}),
    onReset: () => { log.resets += 1; log.tokens = []; },
    onHeartbeat: () => { log.heartbeats += 1; },
    onMetadata: (m) => { log.metadata = m; },
  });
  const done = client.stream({query, method}).then(
    (r) => ({ok: true, text: r.text, metrics: r.metrics, streamId: r.streamId}),
    (e) => ({ok: false, code: e.code, status: e.status, name: e.name, message: e.message}));
  window.__bz = {log, client, done};
  if (background) return null;
  const result = await done;
  return {...result, log};
}
"""
FINISH = "async () => { const r = await window.__bz.done; return {...r, log: window.__bz.log}; }"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with launch_chromium() as b:
        yield b


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    p = context.new_page()
    p.set_default_timeout(30_000)
    yield p
    context.close()


def open_demo(page: Any, bridge: Bridge) -> list[str]:
    problems = console_collector(page)
    page.goto(bridge.url + "/")
    wait_js(page, "document.documentElement.dataset.ready === 'true'")
    return problems


def wait_js(page: Any, condition: str, timeout_ms: int = 30_000) -> None:
    """Wait until a JS expression is true in the page.

    Playwright's wait_for_function evaluates its predicate with eval(), which the demo page's CSP
    (script-src 'self', no unsafe-eval) forbids; this compiles the check through the DevTools
    protocol instead and re-checks it on every animation frame.
    """
    script = (
        "async () => { const deadline = performance.now() + TIMEOUT;"
        " while (!(CONDITION)) { if (performance.now() > deadline) throw new Error('timed out: ' + LABEL);"
        " await new Promise((r) => requestAnimationFrame(r)); } }"
    )
    page.evaluate(
        script.replace("TIMEOUT", str(timeout_ms))
        .replace("LABEL", json.dumps(condition))
        .replace("CONDITION", condition)
    )


def run(page: Any, query: str, method: str, background: bool = False, **options: Any) -> Any:
    return page.evaluate(RUN_STREAM, {"query": query, "method": method, "options": options, "background": background})


def bridge_env(stub: Stub, tmp: Path, **extra: str) -> dict[str, str]:
    env = {
        "ENABLE_SSE_STREAMING": "true",
        "RAG_TARGET": stub.target,
        "AUDIT_DB": str(tmp / "audit.sqlite3"),
        "LOG_LEVEL": "WARNING",
    }
    env.update(extra)
    return env


# -- every edge-case payload, GET and POST --------------------------------------------------------


@pytest.fixture(scope="module")
def echo_bridge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bridge]:
    stub = Stub("--mode", "echo", "--echo-delimiter", DELIM, "--max-query-bytes", "70000")
    tmp = tmp_path_factory.mktemp("echo-bridge")
    bridge = Bridge(
        bridge_env(
            stub,
            tmp,
            MAX_QUERY_BYTES="70000",
            MAX_BODY_BYTES="200000",
            MAX_HEADER_BYTES="131072",  # the GET cases carry up to ~60 KB of URL-encoded query
            RATE_LIMIT="10000/minute",
            MAX_STREAMS_PER_USER="50",
        )
    )
    yield bridge
    bridge.stop()
    stub.stop()


@pytest.fixture(scope="module")
def echo_page(browser: Any, echo_bridge: Bridge) -> Iterator[tuple[Any, list[str]]]:
    context = browser.new_context()
    p = context.new_page()
    p.set_default_timeout(60_000)
    problems = open_demo(p, echo_bridge)
    yield p, problems
    context.close()


@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("payload", list(PAYLOADS.values()), ids=list(PAYLOADS))
def test_edge_payload_reassembled_exactly(echo_page: tuple[Any, list[str]], payload: str, method: str) -> None:
    page, problems = echo_page
    if method == "GET" and len(payload.encode()) > 60_000:
        payload = GET_MAX
    pieces = ["<", payload, ">"]  # the payload is one token of its own, framed by two others
    result = run(page, DELIM.join(pieces), method)
    assert result["ok"], result
    assert result["log"]["tokens"] == pieces
    assert result["text"] == "".join(pieces)
    assert result["metrics"]["tokens"] == 3
    assert result["metrics"]["reconnects"] == 0
    assert not problems


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_ten_thousand_one_character_tokens(page: Any, stub_factory: Any, bridge_factory: Any, method: str) -> None:
    # "~" is unreserved in URLs, so the 10 000 tokens fit in a GET query string (␞ would triple it).
    stub = stub_factory("--mode", "echo", "--echo-delimiter", "~", "--max-query-bytes", "70000")
    bridge = bridge_factory(stub, MAX_QUERY_BYTES="70000", MAX_BODY_BYTES="200000", MAX_HEADER_BYTES="131072")
    problems = open_demo(page, bridge)
    result = run(page, "~".join(TEN_THOUSAND), method)
    assert result["ok"], result
    assert result["log"]["tokens"] == TEN_THOUSAND
    assert result["text"] == "".join(TEN_THOUSAND)
    m = result["metrics"]
    assert m["tokens"] == 10_000 and m["interTokenMs"]["max"] is not None and m["timeToFirstTokenMs"] >= 0
    assert not problems


def test_traceparent_sent_on_both_transports(echo_page: tuple[Any, list[str]]) -> None:
    page, _ = echo_page
    seen: list[Any] = []
    page.on("request", lambda r: seen.append(r) if STREAM_PATH in r.url else None)
    for method in ("GET", "POST"):
        assert run(page, "a" + DELIM + "b", method)["ok"]
    get, post = seen[-2], seen[-1]
    assert get.method == "GET" and "traceparent=00-" in get.url
    assert post.method == "POST" and post.headers["traceparent"].startswith("00-")
    assert len(post.headers["traceparent"].split("-")[1]) == 32


# -- Stop cancels upstream ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_stop_button_cancels_upstream(page: Any, stub_factory: Any, bridge_factory: Any, method: str) -> None:
    stub = stub_factory("--mode", "echo", "--token-delay-ms", "30", "--repeat", "200")
    bridge = bridge_factory(stub)
    problems = open_demo(page, bridge)
    page.fill("#query", "Streaming until someone presses stop.")
    page.click(f"label[for=method-{method.lower()}]")
    assert page.is_checked(f"#method-{method.lower()}")
    page.click("#ask")
    wait_js(page, "document.getElementById('answer').textContent.length > 20")
    request_id = page.evaluate("window.baliZeroDemo.requestId")
    assert request_id
    page.click("#stop")
    wait_js(page, "document.getElementById('state').dataset.state === 'aborted'")
    end = stub.wait_for_end(request_id, timeout=10)
    assert end["outcome"] == "cancelled", end
    assert page.is_disabled("#stop") and page.is_enabled("#ask")
    assert not problems


# -- reconnect with growing backoff after the bridge dies -----------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_bridge_restart_reconnects_with_growing_backoff(
    page: Any, stub_factory: Any, tmp_path: Path, method: str
) -> None:
    stub = stub_factory("--mode", "echo", "--echo-delimiter", DELIM, "--token-delay-ms", "20")
    pieces = [f"w{i} " for i in range(150)]
    env = bridge_env(stub, tmp_path)
    first = Bridge(base_env(env))
    second: Bridge | None = None
    try:
        open_demo(page, first)
        base, cap = 100, 800
        run(
            page, DELIM.join(pieces), method, background=True, backoff={"baseMs": base, "maxMs": cap, "maxAttempts": 20}
        )
        wait_js(page, "window.__bz.log.tokens.length >= 10")
        first.kill()  # a crash: no goodbye frame
        wait_js(page, "window.__bz.log.reconnects.length >= 4")
        second = Bridge(base_env(env), "--port", str(first.port))
        result = page.evaluate(FINISH)
    finally:
        if second is not None:
            second.stop()
        first.stop()
    assert result["ok"], result
    log = result["log"]
    # The new process cannot resume the old stream: it says STREAM_EXPIRED and the client asks again.
    assert "".join(log["tokens"]) == "".join(pieces) == result["text"]
    attempts = log["reconnects"]
    assert len(attempts) >= 4
    assert [a["attempt"] for a in attempts[:4]] == [1, 2, 3, 4]
    for a in attempts:
        if a["code"] == "STREAM_EXPIRED":
            continue
        ceiling = min(cap, base * 2 ** (a["attempt"] - 1))
        assert 0 <= a["delayMs"] <= ceiling, a
    delays = [a["delayMs"] for a in attempts[:4]]
    assert delays == sorted(delays) and delays[-1] > delays[0], delays
    # the pauses really happened (the page clock): each gap at least the announced delay
    for prev, nxt in itertools.pairwise(attempts):
        assert nxt["at"] - prev["at"] >= prev["delayMs"] - 5, (prev, nxt)
    assert result["metrics"]["reconnects"] == len(attempts)


# -- 429 surfaces without a retry storm -----------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_rate_limit_surfaces_once_without_retry_storm(
    page: Any, stub_factory: Any, bridge_factory: Any, method: str
) -> None:
    stub = stub_factory("--mode", "echo")
    bridge = bridge_factory(stub, RATE_LIMIT="2/minute")
    open_demo(page, bridge)
    for _ in range(2):
        assert run(page, "hello there", method)["ok"]
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.method) if STREAM_PATH in r.url else None)
    result = run(page, "one too many", method, backoff={"baseMs": 10, "maxMs": 20})
    assert not result["ok"]
    assert result["status"] == 429
    log = result["log"]
    assert len(log["errors"]) == 1 and log["errors"][0]["status"] == 429
    assert log["errors"][0]["retryAfterMs"] and log["errors"][0]["retryAfterMs"] > 0
    assert log["reconnects"] == []
    # POST: one request. GET: the EventSource attempt plus one fetch that reads the status.
    assert len(requests) == (1 if method == "POST" else 2), requests
    assert log["states"][-1] == "error"


# -- heartbeat watchdog ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_heartbeats_keep_a_slow_first_token_alive(
    page: Any, stub_factory: Any, bridge_factory: Any, method: str
) -> None:
    stub = stub_factory("--mode", "echo", "--first-token-delay-ms", "2500")
    bridge = bridge_factory(stub, HEARTBEAT_INTERVAL_S="0.5")
    open_demo(page, bridge)
    result = run(page, "slow thinker", method, heartbeatIntervalMs=500)
    assert result["ok"], result
    assert result["log"]["heartbeats"] >= 3
    assert result["log"]["reconnects"] == []
    assert result["text"] == "slow thinker"


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_watchdog_reconnects_when_the_bridge_goes_silent(
    page: Any, stub_factory: Any, bridge_factory: Any, method: str
) -> None:
    stub = stub_factory("--mode", "echo", "--echo-delimiter", DELIM, "--first-token-delay-ms", "1500")
    bridge = bridge_factory(stub, HEARTBEAT_INTERVAL_S="0.4", RESUME_GRACE_S="30")
    open_demo(page, bridge)
    pieces = ["a", "b", "c"]
    run(
        page,
        DELIM.join(pieces),
        method,
        background=True,
        heartbeatIntervalMs=400,
        backoff={"baseMs": 50, "maxMs": 200, "maxAttempts": 20},
    )
    wait_js(page, "window.__bz.log.heartbeats >= 1")
    bridge.signal(signal.SIGSTOP)  # the process freezes: the socket stays open, nothing flows
    try:
        wait_js(page, "window.__bz.log.reconnects.some((r) => r.code === 'heartbeat_timeout')")
    finally:
        bridge.signal(signal.SIGCONT)
    result = page.evaluate(FINISH)
    assert result["ok"], result
    assert result["text"] == "abc"
    assert result["log"]["reconnects"][0]["code"] == "heartbeat_timeout"


# -- the demo page --------------------------------------------------------------------------------


def test_demo_page_streams_and_screenshot(page: Any, stub_factory: Any, bridge_factory: Any) -> None:
    stub = stub_factory("--mode", "rag", "--token-delay-ms", "35")
    bridge = bridge_factory(stub)
    problems = open_demo(page, bridge)
    csp = page.evaluate("fetch('/').then((r) => r.headers.get('content-security-policy'))")
    assert csp and "default-src 'self'" in csp
    page.click("#suggestions .chip >> nth=0")
    page.click("#ask")
    wait_js(page, "document.querySelectorAll('#sources li').length > 0")
    wait_js(page, "document.getElementById('answer').textContent.length > 160")
    assert page.get_attribute("#state", "data-state") == "streaming"
    assert page.text_content("#stat-ttft").endswith("ms")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo.png"))
    wait_js(page, "['done', 'error'].includes(document.getElementById('state').dataset.state)")
    assert page.get_attribute("#state", "data-state") == "done"
    result = page.evaluate("window.baliZeroDemo.result")
    assert page.text_content("#answer") == result["text"]
    assert result["metrics"]["tokens"] > 10
    assert float(page.text_content("#stat-rate")) > 0
    assert not problems


def test_demo_page_renders_markup_in_tokens_as_text(page: Any, echo_bridge: Bridge) -> None:
    problems = open_demo(page, echo_bridge)
    page.fill("#query", "<img src=x onerror=alert(1)><b>bold</b>")
    page.click("#ask")
    wait_js(page, "document.getElementById('state').dataset.state === 'done'")
    assert page.text_content("#answer") == "<img src=x onerror=alert(1)><b>bold</b>"
    assert page.eval_on_selector("#answer", "(el) => el.children.length") == 0
    assert not problems


def test_demo_page_is_responsive(page: Any, echo_bridge: Bridge) -> None:
    page.set_viewport_size({"width": 390, "height": 844})
    open_demo(page, echo_bridge)
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390
    boxes = [page.locator(sel).bounding_box() for sel in (".ask", ".answer-card", ".sources-card")]
    assert all(b is not None for b in boxes)
    assert boxes[0]["y"] < boxes[1]["y"] < boxes[2]["y"]  # one column, in reading order
