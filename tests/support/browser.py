"""Headless Chromium for the browser tests: the system's /usr/bin/chromium driven by Playwright.

No browser is ever downloaded (PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1, ``executable_path``). Missing
Chromium or Playwright: the test is skipped locally and fails when CI=true, like every other
system binary the suite needs.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "/usr/bin/chromium-browser")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _missing(message: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def chromium_path() -> str:
    env = os.environ.get("CHROMIUM_PATH")
    for candidate in ((env,) if env else ()) + CHROMIUM_CANDIDATES:
        found = shutil.which(candidate) or (
            candidate if os.path.isabs(candidate) and os.access(candidate, os.X_OK) else None
        )
        if found:
            return found
    _missing("chromium is not installed (make test installs it with apt-get)")
    raise AssertionError("unreachable")


@contextmanager
def launch_chromium() -> Iterator[Any]:
    """A Playwright (sync API) Browser running the system Chromium; closed on exit."""
    path = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("python playwright is not installed (pip install -e .[test])")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def console_collector(page: Any) -> list[str]:
    """Console errors and uncaught page errors, to assert a page ran clean (CSP included)."""
    problems: list[str] = []
    page.on("console", lambda msg: problems.append(f"console.{msg.type}: {msg.text}") if msg.type == "error" else None)
    page.on("pageerror", lambda exc: problems.append(f"pageerror: {exc}"))
    return problems
