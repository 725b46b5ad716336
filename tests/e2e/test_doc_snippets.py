"""The documentation's examples run as written: the browser snippet in Chromium, the curl lines with curl.

Snippets are found by a marker line (``<!-- snippet: NAME -->``) right before their fenced block,
in README.md and in every page of docs/, so sections and snippets can move between them. Each name
appears once across all of them, and every marked snippet has a test here (``TESTED_SNIPPETS``): a
snippet added to the docs without one fails the suite instead of going stale. They are taken
verbatim; the only substitution is the documented ``127.0.0.1:8000`` of `make run`, replaced by the
test bridge's own address. (A browser snippet written as a classic script with a top-level
``await`` is a SyntaxError in every browser: only running it shows that.)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bridge.sse import Parser
from tests.conftest import BridgeFactory, StubFactory, require_binary
from tests.support.browser import console_collector, launch_chromium
from tests.support.processes import ROOT, Bridge

DOCUMENTED_ADDRESS = "127.0.0.1:8000"
MARKER = re.compile(r"^<!-- snippet: (\S+) -->$", re.MULTILINE)
TESTED_SNIPPETS = frozenset(
    {
        "curl",
        "curl-output",
        "curl-text",
        "curl-chat",
        "browser-client",
        "openai-python",
        "openai-js",
        "openai-langchain",
    }
)
"""Every snippet name the tests below run; the docs must mark exactly these."""


def doc_files(root: Path = ROOT) -> list[Path]:
    """README.md and every Markdown page of docs/, where snippets may live."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def snippets_in(text: str) -> dict[str, str]:
    """Each marked snippet of one file: the fenced block right after its marker, verbatim.

    A marker without a fenced block right after it, or a name marked twice, is an error: the test
    meant to run it would otherwise run nothing.
    """
    found: dict[str, str] = {}
    for marker in MARKER.finditer(text):
        name = marker.group(1)
        block = re.compile(r"\n```[\w-]*\n(.*?)^```$", re.MULTILINE | re.DOTALL).match(text, marker.end())
        assert block, f"snippet {name!r}: no fenced block right after its marker"
        assert name not in found, f"snippet {name!r} is marked twice"
        found[name] = block.group(1)
    return found


def all_snippets(files: list[Path] | None = None) -> dict[str, str]:
    """Every marked snippet of the docs by name; a name may appear in one file only."""
    collected: dict[str, str] = {}
    where: dict[str, Path] = {}
    for path in doc_files() if files is None else files:
        for name, code in snippets_in(path.read_text(encoding="utf-8")).items():
            assert name not in collected, f"snippet {name!r} is in both {where[name]} and {path}"
            collected[name], where[name] = code, path
    return collected


def snippet(name: str) -> str:
    """The snippet called ``name``, wherever in the docs it lives."""
    found = all_snippets()
    assert name in found, f"no snippet named {name!r} in README.md or docs/"
    return found[name]


def test_snippets_are_found_by_their_marker() -> None:
    text = "intro\n<!-- snippet: x -->\n```bash\necho 1\n```\n<!-- snippet: y -->\n```\ny\n```\n"
    assert snippets_in(text) == {"x": "echo 1\n", "y": "y\n"}


def test_a_marker_without_its_block_is_refused() -> None:
    with pytest.raises(AssertionError, match="no fenced block"):
        snippets_in("<!-- snippet: x -->\ntext, not a fence\n```\ncode\n```\n")


def test_a_snippet_name_in_two_files_is_refused(tmp_path: Path) -> None:
    for name in ("a.md", "b.md"):
        (tmp_path / name).write_text("<!-- snippet: x -->\n```\ncode\n```\n", encoding="utf-8")
    with pytest.raises(AssertionError, match="is in both"):
        all_snippets([tmp_path / "a.md", tmp_path / "b.md"])


def test_every_snippet_in_the_docs_is_run_by_a_test() -> None:
    """A new snippet gets a test in this file (and its name in TESTED_SNIPPETS), or it goes stale."""
    assert set(all_snippets()) == TESTED_SNIPPETS


@pytest.fixture
def rag_bridge(stub_factory: StubFactory, bridge_factory: BridgeFactory) -> Bridge:
    """The same pair as `make run` (rag mode, streaming on), on free ports."""
    return bridge_factory(stub_factory("--mode", "rag"))


def run_shell_snippet(name: str, bridge: Bridge) -> str:
    require_binary("curl")
    address = bridge.url.removeprefix("http://")
    code = snippet(name)
    assert DOCUMENTED_ADDRESS in code
    done = subprocess.run(
        ["bash", "-c", code.replace(DOCUMENTED_ADDRESS, address)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def frames(raw: str) -> list[dict[str, Any]]:
    return [json.loads(e.data) for e in Parser().feed(raw.encode()) if e.type == "message"]


def test_curl_streams_an_answer_with_sources(rag_bridge: Bridge) -> None:
    real = frames(run_shell_snippet("curl", rag_bridge))
    assert real[0]["type"] == "metadata" and real[0]["sources"]
    assert real[-1]["type"] == "done"
    answer = "".join(f["text"] for f in real if f["type"] == "token")
    assert "B211A" in answer and "[1]" in answer
    # The output shown next to it is what this question really produces (its elided lines aside).
    shown = snippet("curl-output")
    shown_titles = re.findall(r'"title":"([^"]+)"', shown)
    assert shown_titles and shown_titles == [s["title"] for s in real[0]["sources"]][: len(shown_titles)]
    shown_frames = [
        json.loads(line[6:]) for line in shown.splitlines() if line.startswith("data: {") and "…" not in line
    ]
    shown_tokens = [f for f in shown_frames if f["type"] == "token"]
    assert shown_tokens == [f for f in real if f["type"] == "token"][: len(shown_tokens)]
    shown_done = [f for f in shown_frames if f["type"] == "done"]
    assert len(shown_done) == 1 and shown_done[0]["metrics"]["tokens"] == real[-1]["metrics"]["tokens"]


def test_curl_text_one_liner_prints_only_the_answer(rag_bridge: Bridge) -> None:
    printed = run_shell_snippet("curl-text", rag_bridge)
    query = re.search(r"query=([^\"&]+)", snippet("curl-text"))
    assert query
    question = httpx.QueryParams("q=" + query.group(1))["q"]
    expected = httpx.post(rag_bridge.url + "/api/v2/bali-zero/chat", json={"query": question}, timeout=30).json()
    assert printed.strip() == expected["answer"].strip()
    assert "B211A" in printed and "data:" not in printed and '"type"' not in printed


def test_curl_chat_returns_the_whole_answer(rag_bridge: Bridge) -> None:
    reply = json.loads(run_shell_snippet("curl-chat", rag_bridge))
    assert reply["sources"] and reply["finish_reason"] == "stop" and "[1]" in reply["answer"]


def run_snippet(name: str, bridge: Bridge, argv: list[str]) -> str:
    """Run snippet ``name`` with ``argv + [code]`` from the repository root (where node finds
    node_modules), the documented address replaced by the bridge's; its standard output."""
    code = snippet(name)
    assert DOCUMENTED_ADDRESS in code
    done = subprocess.run(
        [*argv, code.replace(DOCUMENTED_ADDRESS, bridge.url.removeprefix("http://"))],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def assert_answer_with_sources(printed: str) -> None:
    """The sources first (one ``[title](uri)`` line each), then the answer's text with its citations."""
    source_lines = re.findall(r"^\[[^\]\n]+\]\(corpus://[^)\s]+\)$", printed, re.MULTILINE)
    assert source_lines and source_lines[0] == "[B211A visit visa](corpus://bali-zero/b211a-visit-visa)", printed
    answer = printed.split(source_lines[-1] + "\n", 1)[1]
    assert answer.startswith("The B211A is a single-entry visit visa") and "[1]" in answer, printed


@pytest.mark.parametrize("name", ["openai-python", "openai-langchain"])
def test_openai_python_snippets_stream_an_answer_with_its_sources(name: str, rag_bridge: Bridge) -> None:
    assert_answer_with_sources(run_snippet(name, rag_bridge, [sys.executable, "-c"]))


def test_the_openai_sdk_snippets_are_five_lines() -> None:
    for name in ("openai-python", "openai-js"):
        assert len([line for line in snippet(name).splitlines() if line.strip()]) == 5, name


def test_openai_js_snippet_streams_an_answer_with_its_sources(rag_bridge: Bridge) -> None:
    require_binary("node", "nodejs")
    if not (ROOT / "node_modules" / "openai").is_dir():
        message = "node_modules/openai is missing (make test runs npm ci)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    assert_answer_with_sources(run_snippet("openai-js", rag_bridge, ["node", "--input-type=module", "-e"]))


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with launch_chromium() as b:
        yield b


@pytest.mark.browser
def test_browser_client_snippet_runs_in_chromium(browser: Any, rag_bridge: Bridge) -> None:
    """The snippet as a page of the bridge's origin: its relative URLs reach the real bridge, and
    ``onComplete`` gets the result object (text and metrics), as the browser-client page says."""
    page_url = rag_bridge.url + "/doc-snippet.html"
    html = f"<!doctype html><html><head><meta charset='utf-8'></head><body>\n{snippet('browser-client')}</body></html>"
    context = browser.new_context()
    try:
        page = context.new_page()
        page.route(page_url, lambda route: route.fulfill(status=200, content_type="text/html", body=html))
        problems = console_collector(page)
        with page.expect_console_message(lambda msg: msg.text.startswith("Complete:"), timeout=30_000) as seen:
            page.goto(page_url)
        args = [arg.json_value() for arg in seen.value.args]
        texts = [arg for arg in args if isinstance(arg, str) and arg != "Complete:"]
        metrics = [arg for arg in args if isinstance(arg, dict)]
        assert any("B211A" in text for text in texts), args  # the answer's text
        assert metrics and metrics[0]["timeToFirstTokenMs"] is not None and metrics[0]["tokens"] > 10, args
        assert not problems, problems
    finally:
        context.close()
