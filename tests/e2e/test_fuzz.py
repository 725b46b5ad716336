"""Schemathesis fuzzing of a running bridge (real processes, echo stub) from bridge/openapi.json.

Every operation of the checked-in description is fuzzed with positive and (where it has inputs)
negative data. Each response must: not be a 5xx; carry no traceback; conform to the documented
status codes, content types, headers and schemas (errors: ``{"error": {"code", "message"}}``);
and, for event streams, be well-formed SSE whose last frame is its only ``done``/``error`` frame,
with the echoed answer equal to the query. After the run no stream may be left open: the bridge
holds no session and counts no open stream, and the stub ended as many gRPC streams as the bridge
opened, none of them abandoned.

Bounded by ``FUZZ_EXAMPLES`` (total cases, default 240); ``make fuzz`` runs 5000.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from bridge import sse
from bridge.apidocs import load_openapi
from bridge.config import Settings
from tests.conftest import BridgeFactory, StubFactory
from tests.e2e.test_openapi import loaded_operations
from tests.support.processes import Bridge, Stub

TOTAL_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "240"))
JWT_SECRET = "fuzz-secret-that-is-long-enough-for-hs256"
STREAM_PATHS = {"/api/v2/bali-zero/chat-stream"}
OPENAI_STREAM_PATH = "/v1/chat/completions"
TRACEBACK = re.compile(rb"Traceback \(most recent call last\)|File \"[^\"]+\", line \d+")
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def fuzz_document() -> dict[str, Any]:
    """The checked-in description, with ``model`` narrowed to the fuzzed bridge's OPENAI_MODELS
    (the default): left a free string, nearly every generated request stopped at 404
    MODEL_NOT_FOUND and the messages behind it were never fuzzed."""
    document = load_openapi()
    request = document["components"]["schemas"]["OpenAIChatRequest"]
    request["properties"]["model"] = {"enum": list(Settings().openai_models)}
    return document


SCHEMA = schemathesis.openapi.from_dict(fuzz_document())
OPERATIONS = loaded_operations(SCHEMA)
# The chat operations are where the logic is: they get three times the share of the others.
WEIGHTS = {
    op.label: 3 if op.path.startswith("/api/v2/bali-zero/chat") or op.path == OPENAI_STREAM_PATH else 1
    for op in OPERATIONS
}


def has_inputs(op: Any) -> bool:
    return bool(list(op.iter_parameters())) or bool(op.body)


COMBOS = [
    (op.label, mode)
    for op in OPERATIONS
    for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
    if mode is schemathesis.GenerationMode.POSITIVE or has_inputs(op)
]
WEIGHT_SUM = sum(WEIGHTS[label] for label, _ in COMBOS)


def examples_for(label: str) -> int:
    return max(3, round(TOTAL_EXAMPLES * WEIGHTS[label] / WEIGHT_SUM))


@dataclass
class Target:
    stub: Stub
    bridge: Bridge
    admin_token: str


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    stub = Stub("--mode", "echo")
    audit = tmp_path_factory.mktemp("fuzz") / "audit.sqlite3"
    try:
        bridge = Bridge(
            {
                "RAG_TARGET": stub.target,
                "ENABLE_SSE_STREAMING": "true",
                "AUDIT_DB": str(audit),
                "LOG_LEVEL": "WARNING",
                "RATE_LIMIT": "1000000/minute",
                "MAX_STREAMS_PER_USER": "1000",
                "HEARTBEAT_INTERVAL_S": "0.05",  # heartbeats show up in some streams and get validated too
                "JWT_SECRET": JWT_SECRET,
            }
        )
    except BaseException:
        stub.stop()
        raise
    token = jwt.encode(
        {"sub": "fuzz-admin", "role": "admin", "exp": int(time.time()) + 3600}, JWT_SECRET, algorithm="HS256"
    )
    yield Target(stub, bridge, token)
    bridge.stop()
    stub.stop()


def check_event_stream(case: Any, content: bytes) -> None:
    """Well-formed SSE: frames with ids and JSON data, ending with its only done/error frame."""
    assert content.endswith(b"\n\n"), "the stream does not end with a complete frame"
    parser = sse.Parser()
    events = parser.feed(content)
    parser.close()
    assert events, "an event stream without events"
    frames = []
    for event in events:
        assert event.last_event_id, f"a frame without id: {event}"
        frame = json.loads(event.data)
        assert (event.type == "heartbeat") == (frame["type"] == "heartbeat"), event
        frames.append(frame)
    finals = [i for i, f in enumerate(frames) if f["type"] in ("done", "error")]
    assert finals == [len(frames) - 1], f"done/error must be the last frame and only once: {frames}"
    if frames[-1]["type"] != "done":
        return
    query = (
        case.query.get("query")
        if case.method == "GET"
        else (case.body.get("query") if isinstance(case.body, dict) else None)
    )
    if isinstance(query, str):
        answer = "".join(f["text"] for f in frames if f["type"] == "token")
        assert answer == query, "the echoed answer differs from the query"


def check_openai_event_stream(case: Any, content: bytes) -> None:
    """OpenAI's stream: ``data:`` events without ids, chunks then ``[DONE]``, or a last error event."""
    assert content.endswith(b"\n\n"), "the stream does not end with a complete event"
    assert not content.startswith(b"id:") and b"\nid:" not in content and b"\nevent:" not in content
    datas = [event.data for event in sse.Parser().feed(content)]
    assert datas, "an event stream without events"
    if datas[-1] != "[DONE]":
        *chunks, last = datas
        assert set(json.loads(last)) == {"error"}, datas
        assert "[DONE]" not in chunks
        return
    parsed = [json.loads(d) for d in datas[:-1]]
    assert all(p["object"] == "chat.completion.chunk" for p in parsed), parsed
    assert parsed[0]["choices"][0]["delta"]["role"] == "assistant"
    finals = [i for i, p in enumerate(parsed) if p["choices"] and p["choices"][0]["finish_reason"] is not None]
    assert len(finals) == 1, parsed
    messages = case.body.get("messages") if isinstance(case.body, dict) else None
    question = messages[-1]["content"] if isinstance(messages, list) and messages else None
    if isinstance(question, list):
        question = "".join(part["text"] for part in question)
    if isinstance(question, str):
        answer = "".join(p["choices"][0]["delta"].get("content", "") for p in parsed if p["choices"])
        assert answer == question, "the echoed answer differs from the question"


def _values(value: Any) -> list[str]:
    items = value if isinstance(value, list) else [value]
    return [v for v in items if isinstance(v, str)]


def run_case(target: Target, case: Any) -> None:
    headers = {"Authorization": f"Bearer {target.admin_token}"} if case.path == "/api/admin/audit" else None
    response = case.call(base_url=target.bridge.url, headers=headers, timeout=30)
    content = response.content
    assert not TRACEBACK.search(content), f"a traceback in the body of {case.method} {case.formatted_path}"
    case.validate_response(response, checks=CHECKS, headers=headers)
    content_type = response.headers.get("content-type", [""])[0]
    if response.status_code >= 400:
        body = json.loads(content)
        shape = {"message", "type", "code", "param"} if case.path.startswith("/v1/") else {"code", "message"}
        assert set(body) == {"error"} and set(body["error"]) == shape, body
    if case.path in STREAM_PATHS and response.status_code == 200:
        assert content_type.startswith("text/event-stream"), content_type
        assert "content-length" not in {k.lower() for k in response.headers}
        check_event_stream(case, content)
    if case.path == OPENAI_STREAM_PATH and response.status_code == 200 and content_type.startswith("text/event-stream"):
        assert "content-length" not in {k.lower() for k in response.headers}
        check_openai_event_stream(case, content)


@pytest.mark.timeout(max(300, TOTAL_EXAMPLES))
@pytest.mark.parametrize(
    ("label", "mode"), [pytest.param(label, mode, id=f"{label} {mode.value}", marks=[]) for label, mode in COMBOS]
)
def test_fuzz_operation(target: Target, label: str, mode: schemathesis.GenerationMode) -> None:
    operation = next(op for op in OPERATIONS if op.label == label)

    @settings(
        max_examples=examples_for(label),
        deadline=None,
        database=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def fuzz(case: Any) -> None:
        run_case(target, case)

    fuzz()


def test_no_stream_left_open_after_fuzzing(target: Target) -> None:
    """Runs after the fuzz tests (file order): every stream the fuzzer opened is closed on both sides."""
    deadline = time.monotonic() + 15
    while True:
        stats = httpx.get(f"{target.bridge.url}/api/v2/bali-zero/stream-stats", timeout=10).json()
        ends = target.stub.stream_ends()
        settled = (
            stats["open_streams"] == 0
            and stats["sessions_held"] == 0
            and stats["open_connections_by_cap"] == 0
            and len(ends) == stats["streams_opened"]
        )
        if settled or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert stats["streams_opened"] > 0, "the fuzzer never opened a stream"
    assert stats["open_streams"] == 0, stats
    assert stats["sessions_held"] == 0, stats
    assert stats["open_connections_by_cap"] == 0, stats
    assert len(ends) == stats["streams_opened"], (len(ends), stats)
    outcomes = {e["outcome"] for e in ends}
    assert outcomes <= {"completed"}, f"streams the fuzzer read to the end ended as {outcomes}"
    assert target.bridge.proc.poll() is None, "the bridge died"
    logged = "\n".join(target.bridge.stderr_lines + target.bridge.lines)
    assert "Traceback" not in logged, target.bridge.output()


# -- inputs the fuzzer once turned into 500s: resume ids with line breaks or non-ASCII digits -------


def _resume_status(
    stub_factory: StubFactory,
    bridge_factory: BridgeFactory,
    params: dict[str, str],
    headers: dict[bytes, bytes] | None = None,
) -> tuple[int, bytes, Bridge]:
    stub: Stub = stub_factory("--mode", "echo")
    bridge = bridge_factory(stub)
    response = httpx.get(
        f"{bridge.url}/api/v2/bali-zero/chat-stream", params={"query": "hi", **params}, headers=headers, timeout=10
    )
    return response.status_code, response.content, bridge


@pytest.mark.parametrize("last_event_id", ["a\nb:1", "a\rb:1", "a\x00b:1"])
def test_resume_id_with_line_break_is_not_a_500(
    stub_factory: StubFactory, bridge_factory: BridgeFactory, last_event_id: str
) -> None:
    status, content, bridge = _resume_status(stub_factory, bridge_factory, {"last_event_id": last_event_id})
    assert status < 500, content
    assert "Traceback" not in "\n".join(bridge.stderr_lines)


@pytest.mark.parametrize(
    ("params", "headers"),
    [
        ({"last_event_id": "abc:\u00b2"}, None),
        ({}, {b"last-event-id": b"abc:\xb2"}),
        ({}, {b"last-event-id": b"\xb2", b"x-connection-id": b"abc"}),
    ],
    ids=["query", "header", "x-connection-id"],
)
def test_non_ascii_digit_in_resume_id_is_not_a_500(
    stub_factory: StubFactory, bridge_factory: BridgeFactory, params: dict[str, str], headers: dict[bytes, bytes] | None
) -> None:
    status, content, bridge = _resume_status(stub_factory, bridge_factory, params, headers)
    assert status < 500, content
    assert "Traceback" not in "\n".join(bridge.stderr_lines)


def test_the_fuzz_budget_scales(tmp_path: Path) -> None:
    assert sum(examples_for(label) for label, _ in COMBOS) >= min(TOTAL_EXAMPLES, 200) * 0.9
