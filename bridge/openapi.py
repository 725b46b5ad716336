"""The checked-in OpenAPI 3.1 description of the HTTP surface (``bridge/openapi.json``), served as is.

The file is the source of truth: ``tests/test_openapi.py`` checks that it is valid OpenAPI 3.1 and
that its paths and methods are exactly the app's routes, and ``tests/test_fuzz.py`` fuzzes a
running bridge from it. The bytes are read once and served unchanged at ``GET /openapi.json``.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

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
