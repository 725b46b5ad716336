"""The API described to its readers: ``GET /openapi.json`` and ``GET /docs``.

``GET /openapi.json`` serves the checked-in OpenAPI 3.1 description of the HTTP surface
(``bridge/openapi.json``) as is. The file is the source of truth: ``tests/e2e/test_openapi.py``
checks that it is valid OpenAPI 3.1 and that its paths and methods are exactly the app's routes,
and ``tests/e2e/test_fuzz.py`` fuzzes a running bridge from it. The bytes are read once and served
unchanged.

``GET /docs`` is Swagger UI over ``/openapi.json``, served from the installed package, never a
CDN. The machines the bridge runs on may be offline, and the page keeps the same strict CSP as the
demo page (no inline script or style, nothing from another origin): the HTML and its initializer
are ours (``static/docs.html``, ``static/docs.js``); the two Swagger UI files come from the
``swagger-ui-bundle-v2`` wheel. Only those two files are served, by name, so the package's own
``index.html`` (inline scripts) and source maps are not reachable.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import swagger_ui_bundle
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route

from bridge.errors import NotFound

OPENAPI_PATH = Path(__file__).with_name("openapi.json")


@cache
def openapi_bytes() -> bytes:
    """The document exactly as checked in."""
    return OPENAPI_PATH.read_bytes()


def load_openapi() -> dict[str, Any]:
    """The document as a fresh dict (callers may modify it)."""
    document: dict[str, Any] = json.loads(openapi_bytes())
    return document


async def openapi_endpoint(request: Request) -> Response:
    """``GET /openapi.json``."""
    return Response(openapi_bytes(), media_type="application/json", headers={"cache-control": "public, max-age=300"})


# --------------------------------------------------------------------------------------- GET /docs
SWAGGER_UI_DIR = Path(swagger_ui_bundle.swagger_ui_path)
ASSETS = {
    "swagger-ui.css": "text/css; charset=utf-8",
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
}
ASSETS_PATH = "/docs/assets"


def docs_routes(page: Path) -> list[Route | Mount]:
    """The page at ``/docs`` and its two vendor files under ``/docs/assets/``.

    The CSP and the other page headers come from ``bridge/middleware.py``, like every HTML response.
    """

    async def docs_page(request: Request) -> Response:
        return FileResponse(page, media_type="text/html; charset=utf-8")

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in ASSETS:
            raise NotFound("no such file")
        return FileResponse(
            SWAGGER_UI_DIR / name,
            media_type=ASSETS[name],
            headers={"cache-control": "public, max-age=86400"},
        )

    return [
        Route("/docs", docs_page, methods=["GET"]),
        Mount(ASSETS_PATH, routes=[Route("/{name}", asset, methods=["GET"])]),
    ]
