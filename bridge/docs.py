"""``GET /docs``: Swagger UI over ``/openapi.json``, served from the installed package, never a CDN.

The machines the bridge runs on may be offline, and the page keeps the same strict CSP as the demo
page (no inline script or style, nothing from another origin): the HTML and its initializer are
ours (``static/docs.html``, ``static/docs.js``); the two Swagger UI files come from the
``swagger-ui-bundle-v2`` wheel. Only those two files are served, by name, so the package's own
``index.html`` (inline scripts) and source maps are not reachable.
"""

from __future__ import annotations

from pathlib import Path

import swagger_ui_bundle
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route

from bridge.errors import NotFound

SWAGGER_UI_DIR = Path(swagger_ui_bundle.swagger_ui_path)
ASSETS = {
    "swagger-ui.css": "text/css; charset=utf-8",
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
}
ASSETS_PATH = "/docs/assets"


def docs_routes(page: Path) -> list[Route | Mount]:
    """The page at ``/docs`` and its two vendor files under ``/docs/assets/``.

    The CSP and the other page headers come from ``bridge/pageheaders.py``, like every HTML response.
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
