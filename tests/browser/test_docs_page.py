"""``GET /docs``: Swagger UI from the installed package renders every operation under the strict CSP."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bridge.apidocs import load_openapi
from tests.conftest import BridgeFactory, StubFactory
from tests.support.browser import console_collector, launch_chromium
from tests.support.processes import Bridge

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
HTTP_METHODS = {"get", "post", "put", "patch", "delete"}


@pytest.fixture
def bridge(stub_factory: StubFactory, bridge_factory: BridgeFactory) -> Bridge:
    return bridge_factory(stub_factory())


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with launch_chromium() as b:
        yield b


@pytest.mark.browser
def test_docs_page_renders_every_operation_under_the_csp(browser: Any, bridge: Bridge) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        page = context.new_page()
        problems = console_collector(page)
        requested: list[str] = []
        page.on("request", lambda request: requested.append(request.url))
        response = page.goto(bridge.url + "/docs")
        assert response is not None and response.status == 200
        csp = response.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
        page.wait_for_selector(".opblock-summary-path", timeout=30_000)
        paths = [el.get_attribute("data-path") for el in page.query_selector_all(".opblock-summary-path")]
        methods = [el.text_content().strip().lower() for el in page.query_selector_all(".opblock-summary-method")]
        shown = set(zip(paths, methods, strict=True))
        document = load_openapi()
        documented = {(path, m) for path, item in document["paths"].items() for m in item if m in HTTP_METHODS}
        assert shown == documented
        assert page.text_content(".info .title").startswith(document["info"]["title"])
        assert all(url.startswith(bridge.url + "/") for url in requested), requested  # no CDN
        assert not problems, problems
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "docs.png"))
    finally:
        context.close()


def test_docs_assets_are_served_by_name_only(bridge: Bridge) -> None:
    """The package's own index.html (inline scripts) and source maps are not reachable."""
    with httpx.Client(base_url=bridge.url, timeout=10) as client:
        assert client.get("/docs/assets/swagger-ui-bundle.js").status_code == 200
        assert client.get("/docs/assets/swagger-ui.css").headers["content-type"].startswith("text/css")
        for name in ("index.html", "swagger-ui-bundle.js.map", "..%2Fswagger-ui.js", "swagger-initializer.js"):
            reply = client.get(f"/docs/assets/{name}")
            assert reply.status_code == 404 and reply.json()["error"]["code"] == "NOT_FOUND", name
