"""The browser's six-connection limit, in a real Chromium through the real nginx of deploy/nginx.conf.

Twelve EventSource streams from one page: over the TLS + HTTP/2 listener all twelve stream at
once; over plain HTTP/1.1 Chromium opens six connections to the origin and the other six streams
wait for one of those to end.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import BridgeFactory, StubFactory
from tests.support.browser import launch_chromium
from tests.support.nginx import NginxFactory, nginx_factory  # noqa: F401 (fixture)

pytestmark = pytest.mark.browser

STREAMS = 12
HTTP1_CONNECTIONS_PER_ORIGIN = 6
# Each stream lasts ~10 s (40 tokens 250 ms apart); streams that can open get their first
# frame within a few hundred ms, so at 3 s the ones still waiting are waiting for a connection.
OBSERVE_AT_MS = 3000

OPEN_STREAMS = """
async ({count, observeAtMs}) => {
  const first = new Array(count).fill(null);
  const sources = [];
  const t0 = performance.now();
  for (let i = 0; i < count; i++) {
    const es = new EventSource(`/api/v2/bali-zero/chat-stream?query=${encodeURIComponent('a b c d ' + i)}`);
    es.onmessage = () => { if (first[i] === null) first[i] = performance.now() - t0; };
    sources.push(es);
  }
  await new Promise((r) => setTimeout(r, observeAtMs));
  const seen = first.slice();
  for (const es of sources) es.close();
  const protocol = performance.getEntriesByType('navigation')[0].nextHopProtocol;
  return {first: seen, protocol};
}
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with launch_chromium() as b:
        yield b


def _open_twelve(browser: Any, page_url: str) -> dict[str, Any]:
    context = browser.new_context(ignore_https_errors=True)
    try:
        page = context.new_page()
        page.set_default_timeout(30_000)
        page.goto(page_url + "/")
        result: dict[str, Any] = page.evaluate(OPEN_STREAMS, {"count": STREAMS, "observeAtMs": OBSERVE_AT_MS})
        return result
    finally:
        context.close()


def test_twelve_streams_from_one_page_all_flow_over_http2_but_only_six_over_http1(
    browser: Any,
    stub_factory: StubFactory,
    bridge_factory: BridgeFactory,
    nginx_factory: NginxFactory,  # noqa: F811
) -> None:
    stub = stub_factory("--mode", "echo", "--token-delay-ms", "250", "--repeat", "10")
    env = {"TRUSTED_PROXIES": "127.0.0.1/32", "MAX_STREAMS_PER_USER": "50", "RATE_LIMIT": "1000/minute"}
    a, b = bridge_factory(stub, **env), bridge_factory(stub, **env)
    nginx = nginx_factory(a.url, b.url)
    assert nginx.tls_url is not None

    h2 = _open_twelve(browser, nginx.tls_url)
    assert h2["protocol"] == "h2", h2
    flowing = [t for t in h2["first"] if t is not None]
    assert len(flowing) == STREAMS, f"over HTTP/2 only {len(flowing)} of {STREAMS} streams flowed: {h2}"

    h1 = _open_twelve(browser, nginx.url)
    assert h1["protocol"] == "http/1.1", h1
    flowing = [t for t in h1["first"] if t is not None]
    assert len(flowing) == HTTP1_CONNECTIONS_PER_ORIGIN, f"over HTTP/1.1 {len(flowing)} streams flowed: {h1}"
