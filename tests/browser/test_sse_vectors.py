"""The shared SSE vectors through Chromium's own EventSource: the ground truth the parsers must match.

Each vector's bytes are served (Playwright request routing, no network) as a text/event-stream
response; the page records what EventSource dispatches until the connection ends.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.browser import launch_chromium

pytestmark = pytest.mark.browser

VECTORS: list[dict[str, Any]] = json.loads(
    (Path(__file__).resolve().parents[1] / "vectors" / "sse_vectors.json").read_text(encoding="utf-8")
)["vectors"]
ORIGIN = "http://vectors.test"

COLLECT = """
async ({url, types}) => new Promise((resolve) => {
  const events = [];
  const es = new EventSource(url);
  const record = (ev) => events.push({type: ev.type, data: ev.data, id: ev.lastEventId});
  for (const t of types) if (t !== 'error') es.addEventListener(t, record);
  es.addEventListener('error', (ev) => {
    if (ev instanceof MessageEvent) { record(ev); return; }  // a server-sent `event: error`
    es.close();  // end of the body: stop before EventSource reconnects
    resolve(events);
  });
})
"""


@pytest.fixture(scope="module")
def vector_page() -> Iterator[Any]:
    with launch_chromium() as browser:
        page = browser.new_page()
        bodies: dict[str, bytes] = {}

        def handle(route: Any) -> None:
            path = route.request.url[len(ORIGIN) :]
            if path == "/":
                route.fulfill(status=200, content_type="text/html", body="<!doctype html><title>v</title>")
            else:
                route.fulfill(
                    status=200,
                    headers={"content-type": "text/event-stream", "cache-control": "no-cache"},
                    body=bodies[path],
                )

        page.route(ORIGIN + "/**", handle)
        page.goto(ORIGIN + "/")
        page.bodies = bodies
        yield page


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_chromium_eventsource_agrees_with_the_vector(vector_page: Any, vector: dict[str, Any]) -> None:
    body = b"".join(c.encode("utf-8") if isinstance(c, str) else bytes(c) for c in vector["chunks"])
    path = f"/stream/{len(vector_page.bodies)}"
    vector_page.bodies[path] = body
    types = sorted({e["type"] for e in vector["events"]} | {"message"})
    events = vector_page.evaluate(COLLECT, {"url": ORIGIN + path, "types": types})
    assert events == vector["events"]
