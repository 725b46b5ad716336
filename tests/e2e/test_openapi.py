"""The checked-in OpenAPI description: valid OpenAPI 3.1, and in step with the app's routes.

Validity is checked with the OpenAPI 3.1 meta-schema schemathesis ships (run by jsonschema_rs),
every embedded schema against the JSON Schema 2020-12 meta-schema, every ``$ref`` resolved, and
schemathesis must be able to build a request strategy for every operation (that is what the fuzz
tests rely on).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR
from starlette.routing import Mount, Route

from bridge.apidocs import OPENAPI_PATH, load_openapi, openapi_bytes, openapi_endpoint
from bridge.app import create_app
from bridge.config import Settings
from tests.conftest import BridgeFactory
from tests.support.processes import Stub

HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return load_openapi()


def documented_operations(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (path, method.upper()) for path, item in document["paths"].items() for method in item if method in HTTP_METHODS
    }


def app_operations(tmp_path: Path) -> set[tuple[str, str]]:
    app = create_app(Settings(audit_db=str(tmp_path / "audit.sqlite3")))
    found: set[tuple[str, str]] = set()
    for route in app.routes:
        if isinstance(route, Mount):
            continue  # /static: files, not operations
        assert isinstance(route, Route), f"unexpected route type {type(route).__name__} at {route}"
        found |= {(route.path, m) for m in route.methods or () if m != "HEAD"}  # Starlette adds HEAD to GET
    return found


def loaded_operations(schema: Any) -> list[Any]:
    """Every operation schemathesis loaded from the document; an unloadable one fails the caller."""
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), f"schemathesis cannot load an operation: {result}"
        operations.append(result.ok())
    return operations


def iter_refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from iter_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from iter_refs(item)


def resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"only local references are used: {ref}"
    node: Any = document
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"unresolvable $ref {ref}"
        node = node[part]
    return node


def iter_schemas(document: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """Every Schema Object in the document, with where it is."""
    components = document["components"]
    for name, schema in components["schemas"].items():
        yield f"components/schemas/{name}", schema
    for name, header in components["headers"].items():
        yield f"components/headers/{name}", header["schema"]
    for name, param in components["parameters"].items():
        if "schema" in param:
            yield f"components/parameters/{name}", param["schema"]
    for path, item in document["paths"].items():
        for method, op in item.items():
            for i, param in enumerate(op.get("parameters", [])):
                for media in param.get("content", {}).values():
                    yield f"{method} {path} parameter {i}", media["schema"]
                if "schema" in param:
                    yield f"{method} {path} parameter {i}", param["schema"]
            for media_type, media in op.get("requestBody", {}).get("content", {}).items():
                yield f"{method} {path} body {media_type}", media["schema"]
            for status, response in op["responses"].items():
                for media_type, media in response.get("content", {}).items():
                    yield f"{method} {path} {status} {media_type}", media["schema"]


# -- the document is valid OpenAPI 3.1 -------------------------------------------------------------


def test_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.1.")
    errors = [f"{'/'.join(map(str, e.instance_path))}: {e.message}" for e in OPENAPI_31_VALIDATOR.iter_errors(document)]
    assert errors == []


def test_every_schema_is_valid_json_schema_2020_12(document: dict[str, Any]) -> None:
    for where, schema in iter_schemas(document):
        try:
            jsonschema_rs.meta.validate(schema)
        except jsonschema_rs.ValidationError as exc:
            pytest.fail(f"{where}: {exc}")


def test_every_reference_resolves(document: dict[str, Any]) -> None:
    refs = set(iter_refs(document))
    assert refs, "the document uses components"
    for ref in refs:
        resolve(document, ref)
    for name in ("Error", "ChatRequest", "ChatAnswer", "Frame", "ServerSentEvent"):
        assert f"#/components/schemas/{name}" in refs, f"{name} is defined but unused"


def test_schemathesis_loads_every_operation(document: dict[str, Any]) -> None:
    schema = schemathesis.openapi.from_dict(document)
    schema.validate()
    loaded = {(op.path, op.method.upper()) for op in loaded_operations(schema)}
    assert loaded == documented_operations(document)


def test_the_file_is_canonical_json() -> None:
    """One-space indented, UTF-8, trailing newline: stable diffs and byte-identical serving."""
    text = OPENAPI_PATH.read_text("utf-8")
    assert text == json.dumps(json.loads(text), indent=1, ensure_ascii=False) + "\n"


# -- the documented frame and error schemas describe what the bridge sends ------------------------


def validator(document: dict[str, Any], name: str) -> jsonschema_rs.Validator:
    schema = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
    return jsonschema_rs.Draft202012Validator(schema)


def test_frame_schema_accepts_what_the_encoder_makes(document: dict[str, Any]) -> None:
    from bridge import sse
    from bridge.errors import ServiceUnavailable

    frame = validator(document, "Frame")
    event = validator(document, "ServerSentEvent")
    samples = [
        sse.token_frame("s1:2", 0, "\r\n\x00é"),
        sse.json_frame(
            "s1:1",
            {
                "type": "metadata",
                "stream_id": "s1",
                "request_id": "r",
                "model": "m",
                "sources": [{"title": "t", "uri": "u", "score": 0.5}],
            },
        ),
        sse.json_frame(
            "s1:3",
            {
                "type": "done",
                "finish_reason": "stop",
                "metrics": {"first_token_ms": None, "tokens": 0, "duration_ms": 1.5},
            },
        ),
        sse.json_frame("s1:4", ServiceUnavailable("down", retryable=True).frame()),
        sse.frame("s1:4", '{"type":"heartbeat"}', event="heartbeat"),
    ]
    for raw in samples:
        (parsed,) = sse.Parser().feed(raw)
        frame.validate(json.loads(parsed.data))
        event.validate({"event": parsed.type, "id": parsed.last_event_id, "data": parsed.data})
    assert not frame.is_valid({"type": "token", "index": 0})
    assert not frame.is_valid({"type": "bogus"})


def test_error_schema_accepts_every_bridge_error(document: dict[str, Any]) -> None:
    from bridge import errors

    error = validator(document, "Error")
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.BridgeError)]
    assert len(classes) >= 10
    for cls in classes:
        error.validate(cls("message").body())
    assert not error.is_valid({"error": {"code": "X"}})
    assert not error.is_valid({"detail": "Not Found"})


def test_openai_schemas_accept_what_the_face_makes(document: dict[str, Any]) -> None:
    from bali_zero.rag.v1 import rag_pb2
    from bridge import errors, openai_compat, sse
    from bridge.types import StreamResult

    chunks = openai_compat.ChatCompletionChunks("s1", "r1", "bali-zero", include_usage=True)
    meta = rag_pb2.Metadata(model="m", sources=[rag_pb2.Source(title="t", uri="u", score=0.5)])
    raw = (
        chunks.metadata(1, meta)
        + chunks.token(2, 0, rag_pb2.Token(text="\r\n\x00é"))
        + chunks.done(3, StreamResult("s1", "r1", "completed", 1, 2.0, 1.0, None, "length"))
        + chunks.error(4, errors.ServiceUnavailable("down", code="SHUTTING_DOWN"))
    )
    event, chunk, error = (validator(document, n) for n in ("OpenAIServerSentEvent", "OpenAIChunk", "OpenAIError"))
    datas = [e.data for e in sse.Parser().feed(raw)]
    assert datas[-2] == "[DONE]"
    for data in datas:
        event.validate({"data": data})
        if data != "[DONE]":
            (error if "error" in json.loads(data) else chunk).validate(json.loads(data))
    reply = rag_pb2.ChatResponse(answer="a", metadata=meta, completion=rag_pb2.Completion(token_count=1))
    validator(document, "OpenAIChatCompletion").validate(openai_compat.completion_body(reply, "bali-zero", "r1"))
    validator(document, "OpenAIModelList").validate(openai_compat.models_body(("bali-zero", "other")))
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.BridgeError)]
    for cls in classes:
        error.validate(cls("message", param="n").openai_body())
    assert not error.is_valid({"error": {"code": "X", "message": "m"}})


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text())
def test_token_frames_of_any_text_match_the_schema(document: dict[str, Any], text: str) -> None:
    from bridge import sse

    (parsed,) = sse.Parser().feed(sse.token_frame("abc:7", 3, text))
    validator(document, "TokenFrame").validate(json.loads(parsed.data))


# -- the routes and the description agree ---------------------------------------------------------


def test_every_route_is_documented_and_every_documented_operation_is_routed(
    document: dict[str, Any], tmp_path: Path
) -> None:
    documented = documented_operations(document) - {("/openapi.json", "GET")}
    routed = app_operations(tmp_path) - {("/openapi.json", "GET")}
    assert sorted(routed - documented) == [], "routes missing from bridge/openapi.json"
    assert sorted(documented - routed) == [], "documented operations the app does not route"


def test_document_lists_openapi_json() -> None:
    assert ("/openapi.json", "GET") in documented_operations(load_openapi())


def test_app_routes_openapi_json_to_the_endpoint(tmp_path: Path) -> None:
    app = create_app(Settings(audit_db=str(tmp_path / "audit.sqlite3")))
    routes = [r for r in app.routes if isinstance(r, Route) and r.path == "/openapi.json"]
    assert len(routes) == 1
    assert routes[0].endpoint is openapi_endpoint
    assert routes[0].methods is not None and "GET" in routes[0].methods


def test_running_bridge_serves_exactly_the_checked_in_file(stub_factory: Any, bridge_factory: BridgeFactory) -> None:
    stub: Stub = stub_factory("--mode", "echo")
    bridge = bridge_factory(stub)
    response = httpx.get(f"{bridge.url}/openapi.json", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].split(";")[0] == "application/json"
    assert response.content == openapi_bytes() == OPENAPI_PATH.read_bytes()
