"""JSON responses for errors and answers; nothing here ever carries a traceback."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from starlette.responses import Response

from bridge.errors import BridgeError


class JSONResponse(Response):
    """UTF-8 JSON. A lone surrogate in a string (legal JSON, read back from a stored record) is
    written as its ``\\uXXXX`` escape: strict UTF-8 encoding would raise, turning the answer into a 500."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "backslashreplace")


def error_response(error: BridgeError, headers: Mapping[str, str] | None = None) -> JSONResponse:
    merged = {**(headers or {}), **error.headers()}
    return JSONResponse(error.body(), status_code=error.status, headers=merged)
