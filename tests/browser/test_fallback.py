"""Clients outside the rollout, in a real Chromium: the shipped client answers through POST /chat.

At 0 %, at 5 % (one user inside the bucket, one outside: the rollout is sticky per user) and with
ENABLE_SSE_STREAMING=false the page gets the same answer through the same callbacks as at 100 %,
marked ``fallback: true``; with ``fallback: false`` it gets the STREAMING_DISABLED error instead.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from bridge.gate import in_rollout
from tests.support.browser import console_collector, launch_chromium
from tests.support.processes import Bridge, Stub

pytestmark = pytest.mark.browser

SECRET = "fallback-test-secret-0123456789abcdef"
QUERY = "what visa do I need for Bali"

RUN = """
async ({method, options}) => {
  const log = {metadata: [], tokens: [], complete: [], errors: []};
  const client = new BaliZeroStreamClient({
    heartbeatIntervalMs: 60000,
    ...options,
    onMetadata: (m) => log.metadata.push({fallback: !!m.fallback, sources: m.sources.length}),
    onToken: (t) => log.tokens.push(t),
    onComplete: (r) => log.complete.push({fallback: r.fallback, text: r.text}),
    onError: (e) => log.errors.push(e.code),
  });
  try {
    const r = await client.stream({query: QUERY, method});
    return {ok: true, fallback: r.fallback, text: r.text, server: r.metrics.server, log};
  } catch (e) {
    return {ok: false, code: e.code, status: e.status, log};
  }
}
""".replace("QUERY", repr(QUERY))


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with launch_chromium() as b:
        yield b


@pytest.fixture(scope="module")
def stub() -> Iterator[Stub]:
    s = Stub()
    yield s
    s.stop()


@pytest.fixture
def page_on(browser: Any) -> Iterator[Any]:
    """``page_on(bridge)``: a fresh page on the bridge's demo (which loads the shipped client)."""
    contexts: list[Any] = []

    def open_page(bridge: Bridge) -> Any:
        context = browser.new_context()
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(30_000)
        page.problems = console_collector(page)
        page.goto(bridge.url + "/")
        return page

    yield open_page
    for context in contexts:
        context.close()


def _bridge(stub: Stub, tmp: Path, **env: str) -> Bridge:
    return Bridge(
        {
            "ENABLE_SSE_STREAMING": "true",
            "RAG_TARGET": stub.target,
            "AUDIT_DB": str(tmp / "audit.db"),
            "LOG_LEVEL": "WARNING",
            "JWT_SECRET": SECRET,
            "RATE_LIMIT": "1000/minute",
            **env,
        }
    )


def _token(user: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": user, "iat": now, "exp": now + 600}, SECRET, algorithm="HS256")


def _user(inside: bool, percent: float) -> str:
    return next(u for i in itertools.count() if in_rollout(f"user:{(u := f'user-{i}')}", percent) == inside)


@pytest.fixture(scope="module")
def streamed(stub: Stub, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The answer as streamed at 100 %: what every fallback must deliver too."""
    bridge = _bridge(stub, tmp_path_factory.mktemp("full"))
    try:
        with httpx.Client(timeout=20) as http:
            return str(http.post(bridge.url + "/api/v2/bali-zero/chat", json={"query": QUERY}).json()["answer"])
    finally:
        bridge.stop()


def _assert_fallback(result: dict[str, Any], answer: str) -> None:
    assert result["ok"], result
    assert result["fallback"] is True
    assert result["text"] == answer
    log = result["log"]
    assert log["metadata"] == [{"fallback": True, "sources": log["metadata"][0]["sources"]}]
    assert log["metadata"][0]["sources"] >= 1  # the RAG stub cites sources
    assert log["tokens"] == [answer]  # one onToken with the whole answer
    assert log["complete"] == [{"fallback": True, "text": answer}]
    assert log["errors"] == []
    assert result["server"]["tokens"] >= 1


def _assert_streamed(result: dict[str, Any], answer: str) -> None:
    assert result["ok"], result
    assert result["fallback"] is False
    assert result["text"] == answer
    assert len(result["log"]["tokens"]) > 1  # really streamed, token by token
    assert result["log"]["complete"] == [{"fallback": False, "text": answer}]


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_streaming_disabled_page_gets_the_answer_through_chat(
    page_on: Any, stub: Stub, streamed: str, tmp_path: Path, method: str
) -> None:
    bridge = _bridge(stub, tmp_path, ENABLE_SSE_STREAMING="false")
    try:
        page = page_on(bridge)
        _assert_fallback(page.evaluate(RUN, {"method": method, "options": {}}), streamed)
        off = page.evaluate(RUN, {"method": method, "options": {"fallback": False}})
        assert (off["ok"], off["code"], off["status"]) == (False, "STREAMING_DISABLED", 404)
        assert page.problems == [] or all("404" in p for p in page.problems), page.problems
    finally:
        bridge.stop()


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_zero_percent_rollout_falls_back_and_full_rollout_streams(
    page_on: Any, stub: Stub, streamed: str, tmp_path: Path, method: str
) -> None:
    zero = _bridge(stub, tmp_path / "zero", SSE_ROLLOUT_PERCENT="0")
    full = _bridge(stub, tmp_path / "full", SSE_ROLLOUT_PERCENT="100")
    try:
        _assert_fallback(page_on(zero).evaluate(RUN, {"method": method, "options": {}}), streamed)
        _assert_streamed(page_on(full).evaluate(RUN, {"method": method, "options": {}}), streamed)
    finally:
        zero.stop()
        full.stop()


def test_five_percent_rollout_streams_for_users_inside_and_falls_back_for_the_rest(
    page_on: Any, stub: Stub, streamed: str, tmp_path: Path
) -> None:
    bridge = _bridge(stub, tmp_path, SSE_ROLLOUT_PERCENT="5")
    inside, outside = _user(True, 5), _user(False, 5)
    try:
        page = page_on(bridge)
        for _ in range(2):  # sticky: the same user gets the same answer path every time
            got_in = page.evaluate(
                RUN, {"method": "POST", "options": {"headers": {"Authorization": f"Bearer {_token(inside)}"}}}
            )
            got_out = page.evaluate(
                RUN, {"method": "POST", "options": {"headers": {"Authorization": f"Bearer {_token(outside)}"}}}
            )
            _assert_streamed(got_in, streamed)
            _assert_fallback(got_out, streamed)
    finally:
        bridge.stop()
