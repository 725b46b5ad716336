"""The shipped browser client in a real Chromium, against a RAG service that breaks its contract.

The wire-level checks are in tests/adversarial/test_seams.py; this is what they protect: the answer
the person in front of the demo page reads, by either method (EventSource GET, fetch POST).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser.test_client import open_demo, run
from tests.support.browser import launch_chromium
from tests.support.hostile_rag import NON_FINITE_SCORES, UNSET_TOKEN_INDEX, HostileRag
from tests.support.processes import Bridge

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def hostile_page(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, list[str]]]:
    rag = HostileRag()
    tmp: Path = tmp_path_factory.mktemp("hostile-rag")
    bridge = Bridge(
        {
            "ENABLE_SSE_STREAMING": "true",
            "RAG_TARGET": rag.target,
            "AUDIT_DB": str(tmp / "audit.sqlite3"),
            "LOG_LEVEL": "WARNING",
            "RATE_LIMIT": "1000/minute",
        }
    )
    try:
        with launch_chromium() as browser:
            context = browser.new_context()
            page = context.new_page()
            page.set_default_timeout(30_000)
            problems = open_demo(page, bridge)
            yield page, problems
            context.close()
    finally:
        bridge.stop()
        rag.stop()


@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("scenario", [NON_FINITE_SCORES, UNSET_TOKEN_INDEX])
def test_browser_client_reads_whole_answer_from_rag_off_contract(
    hostile_page: tuple[Any, list[str]], scenario: str, method: str
) -> None:
    """A NaN score failed the answer with ``bad_frame``; unset token indexes showed "one " only."""
    page, problems = hostile_page
    result = run(page, scenario, method)
    assert result["ok"], result
    assert result["text"] == "one two three"
    assert result["log"]["tokens"] == ["one ", "two ", "three"]
    assert all(isinstance(s["score"], (int, float)) for s in result["log"]["metadata"]["sources"])
    assert problems == []
