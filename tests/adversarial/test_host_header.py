"""A hostile ``Host`` header against every route of a real bridge process.

Starlette's router answered the other slash variant of a path (``/metrics/``, ``/docs/``,
``/healthz/``, ``/docs/assets/swagger-ui.css/``) with a 307 whose Location it built from the
request's Host header: any client chose the host the bridge redirected to. bridge/app.py turns
those redirects off; every variant of every route is tried here with a hostile Host.
"""

from __future__ import annotations

from pathlib import Path

import httpx
from starlette.routing import BaseRoute, Mount, Route

from bridge.app import create_app
from bridge.config import Settings
from tests.conftest import BridgeFactory

EVIL = "evil.example"
ORIGIN = "https://app.example"
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS")
PATH_PARAMS = {"{stream_id}": "s-1", "{name}": "swagger-ui.css"}
STATIC_FILE = "demo.css"
BODY_SAMPLE = 64 * 1024


def _paths(routes: list[BaseRoute], prefix: str = "") -> set[str]:
    """Every route's path with its parameters filled in (and a file under a static mount)."""
    found: set[str] = set()
    for route in routes:
        if isinstance(route, Route):
            path = prefix + route.path
            for param, value in PATH_PARAMS.items():
                path = path.replace(param, value)
            found.add(path)
        elif isinstance(route, Mount):
            found.add(prefix + route.path)
            found |= (
                _paths(route.routes, prefix + route.path) if route.routes else {f"{prefix}{route.path}/{STATIC_FILE}"}
            )
    return found


def route_variants(tmp_path: Path) -> list[str]:
    """Each path as routed, with a trailing slash, without one, and doubled."""
    app = create_app(Settings(audit_db=str(tmp_path / "routes.sqlite3")))
    variants: set[str] = set()
    for path in _paths(list(app.routes)):
        bare = path.rstrip("/") or "/"
        variants |= {path, bare, bare.rstrip("/") + "/", bare + "//"}
    return sorted(variants)


def test_hostile_host_header_is_never_reflected_into_a_redirect_by_any_route_variant(
    bridge_factory: BridgeFactory, tmp_path: Path
) -> None:
    """``Host: evil.example`` (and its forwarded cousins) on every method of every slash variant of
    every route: no response redirects, and ``evil.example`` is in no header and no body."""
    variants = route_variants(tmp_path)
    assert {"/metrics/", "/docs/", "/healthz/", "/readyz/", "/static", "/docs/assets/swagger-ui.css/"} <= set(variants)
    bridge = bridge_factory(None, RAG_TARGET="127.0.0.1:9", CORS_ORIGINS=ORIGIN, RATE_LIMIT="100000/minute")
    hostile = {"Host": EVIL, "X-Forwarded-Host": EVIL, "Forwarded": f"host={EVIL};proto=https", "Origin": ORIGIN}
    reflected: list[str] = []
    redirected: list[str] = []
    with httpx.Client(base_url=bridge.url, timeout=10, follow_redirects=False) as http:
        for path in variants:
            for method in METHODS:
                with http.stream(method, path, headers=hostile) as response:
                    body = b""
                    if not response.headers.get("content-type", "").startswith("text/event-stream"):
                        for chunk in response.iter_raw():
                            body += chunk
                            if len(body) >= BODY_SAMPLE:
                                break
                where = f"{method} {path} -> {response.status_code}"
                if 300 <= response.status_code < 400:
                    redirected.append(f"{where} Location: {response.headers.get('location')}")
                head = "\n".join(f"{name}: {value}" for name, value in response.headers.multi_items())
                if EVIL in head.lower() or EVIL.encode() in body.lower():
                    reflected.append(where)
    assert not redirected, redirected
    assert not reflected, reflected


def test_the_other_slash_variant_of_a_route_is_a_json_404(bridge_factory: BridgeFactory) -> None:
    bridge = bridge_factory(None, RAG_TARGET="127.0.0.1:9")
    with httpx.Client(base_url=bridge.url, timeout=10, follow_redirects=False) as http:
        assert http.get("/metrics").status_code == 200 and http.get("/healthz").status_code == 200
        for path in ("/metrics/", "/docs/", "/healthz/", "/readyz/", "/static", "/docs/assets/swagger-ui.css/"):
            response = http.get(path)
            assert response.status_code == 404, path
            assert response.json()["error"]["code"] == "NOT_FOUND", path
