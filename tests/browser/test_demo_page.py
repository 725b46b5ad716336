"""The demo page reads well: numbered sources, a stopped answer says so, a 429 explains itself,
the stats row stays aligned on a phone. Screenshots at 1280x800 and 390x844 go to tests/artifacts/."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser.test_client import open_demo, wait_js
from tests.conftest import BridgeFactory, StubFactory
from tests.support.browser import launch_chromium

pytestmark = pytest.mark.browser

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
QUESTION = "What documents do I need for a B211A visa?"
DONE = "document.getElementById('state').dataset.state === 'done'"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with launch_chromium() as b:
        yield b


def new_page(browser: Any, width: int, height: int) -> Any:
    page = browser.new_context(viewport={"width": width, "height": height}).new_page()
    page.set_default_timeout(30_000)
    return page


def ask(page: Any, query: str = QUESTION) -> None:
    page.fill("#query", query)
    page.click("#ask")


# On the phone, a slow first token ("1104 ms") is the widest value the stats row shows: it once
# wrapped onto two lines and pushed its label out of line with the others.
@pytest.mark.parametrize(("width", "height", "first_token_delay_ms"), [(1280, 800, "0"), (390, 844, "1100")])
def test_sources_are_numbered_like_the_citations_in_the_answer(
    browser: Any,
    stub_factory: StubFactory,
    bridge_factory: BridgeFactory,
    width: int,
    height: int,
    first_token_delay_ms: str,
) -> None:
    bridge = bridge_factory(stub_factory("--mode", "rag", "--first-token-delay-ms", first_token_delay_ms))
    page = new_page(browser, width, height)
    try:
        problems = open_demo(page, bridge)
        ask(page)
        wait_js(page, DONE)
        answer = page.text_content("#answer")
        numbers = page.eval_on_selector_all("#sources li .number", "(els) => els.map((e) => e.textContent)")
        titles = page.eval_on_selector_all("#sources li .title", "(els) => els.map((e) => e.textContent)")
        sources = page.evaluate("window.baliZeroDemo.result.metadata.sources.map((s) => s.title)")
        assert titles == sources and len(sources) >= 3
        assert numbers == [f"[{n}]" for n in range(1, len(sources) + 1)]
        assert all(number in answer for number in numbers)  # every cited number has its source
        # the number sits beside its title, on the first line of the card
        first_number = page.locator("#sources li >> nth=0").locator(".number").bounding_box()
        first_title = page.locator("#sources li >> nth=0").locator(".title").bounding_box()
        assert first_number["x"] < first_title["x"] and abs(first_number["y"] - first_title["y"]) < 8
        stat_tops = [
            page.locator(f"#{name}").bounding_box()["y"]
            for name in ("stat-ttft", "stat-rate", "stat-tokens", "stat-reconnects")
        ]
        assert max(stat_tops) - min(stat_tops) < 1.0, stat_tops  # values aligned even if a label wraps
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"demo-{width}x{height}.png"), full_page=True)
        assert not problems, problems
    finally:
        page.context.close()


def test_a_stopped_answer_is_marked_stopped(
    browser: Any, stub_factory: StubFactory, bridge_factory: BridgeFactory
) -> None:
    bridge = bridge_factory(stub_factory("--mode", "rag", "--token-delay-ms", "50"))
    page = new_page(browser, 1280, 800)
    try:
        problems = open_demo(page, bridge)
        ask(page)
        wait_js(page, "document.getElementById('answer').textContent.length > 40")
        assert page.is_hidden("#stopped")  # not while it streams
        page.click("#stop")
        wait_js(page, "document.getElementById('state').dataset.state === 'aborted'")
        assert page.is_visible("#stopped")
        assert "stopped" in page.text_content("#stopped").lower()
        assert page.text_content("#state") == "stopped"
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "demo-stopped-1280x800.png"))
        ask(page)  # a new question clears the mark
        wait_js(page, DONE)
        assert page.is_hidden("#stopped")
        assert not problems, problems
    finally:
        page.context.close()


def test_rate_limited_question_says_per_minute_and_hides_the_placeholder(
    browser: Any, stub_factory: StubFactory, bridge_factory: BridgeFactory
) -> None:
    bridge = bridge_factory(stub_factory("--mode", "rag"), RATE_LIMIT="1/minute")
    page = new_page(browser, 390, 844)
    try:
        open_demo(page, bridge)
        ask(page)
        wait_js(page, DONE)
        page.evaluate("document.getElementById('answer').replaceChildren()")  # as a new question does
        ask(page)
        wait_js(page, "document.getElementById('state').dataset.state === 'error'")
        message = page.text_content("#error")
        assert message.startswith("Too many questions per minute.") and "Try again in" in message
        assert "at once" not in message
        assert page.is_visible("#error") and page.is_hidden("#placeholder")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "demo-429-390x844.png"), full_page=True)
    finally:
        page.context.close()
