"""The OpenAI-compatible API proven with the clients people use, against real bridge and stub processes.

The official ``openai`` package (sync and async, streaming and not), LangChain's ``ChatOpenAI``
and the official ``openai`` npm package under node stream a Bali Zero answer with its sources;
every gate of the native stream applies to the new route and each is checked through the SDK:
identity from ``Authorization: Bearer``, the rate limit (429 → the SDK's ``RateLimitError``), the
stream caps, the feature flag and rollout, the audit records (same event types, same query HMAC),
tracing with the first-token event, metrics, cancellation upstream when the client closes,
heartbeats (as SSE comments) and the drain on SIGTERM. No fake server: the clients talk to the
bridge, the bridge to the stub RAG service.
"""

from __future__ import annotations

import functools
import json
import operator
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import openai
import pytest
import redis.asyncio
from langchain_core.messages import AIMessageChunk
from langchain_openai import ChatOpenAI
from pydantic import SecretStr

from bridge.sse import Parser
from tests.conftest import BridgeFactory, StubFactory, require_binary
from tests.e2e.test_observability import (
    bridge_stream_end,
    has_stream_trio,
    metric_samples,
    new_traceparent,
    otel_env,
    sample,
    stop_all,
    stream_trace,
)
from tests.e2e.test_resume_redis import Pair, pair  # noqa: F401  (fixture)
from tests.support.audit import exported
from tests.support.otlp_trace import TraceReceiver
from tests.support.processes import ROOT, Bridge, Stub
from tests.support.redis import redis_factory, redis_server  # noqa: F401  (fixtures)

MODEL = "bali-zero"
QUESTION = "What is the B211A visa?"
MESSAGES: list[Any] = [{"role": "user", "content": QUESTION}]
JWT_SECRET = "openai-face-secret-that-is-long-enough-for-hs256"
B211A_URI = "corpus://bali-zero/b211a-visit-visa"


def sdk(bridge: Bridge, api_key: str = "unused") -> openai.OpenAI:
    """The official client pointed at the bridge; no retries, so each refusal is seen as sent."""
    return openai.OpenAI(base_url=f"{bridge.url}/v1", api_key=api_key, max_retries=0, timeout=30)


def async_sdk(bridge: Bridge, api_key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{bridge.url}/v1", api_key=api_key, max_retries=0, timeout=30)


def extension(chunk: Any) -> dict[str, Any]:
    """The ``bali_zero`` extension field of a chunk or completion ({} when absent)."""
    found: dict[str, Any] = (chunk.model_extra or {}).get("bali_zero") or {}
    return found


def text_of(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


def token(sub: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": sub, "iat": now, "exp": now + 600, "role": "member"}, JWT_SECRET, algorithm="HS256")


@pytest.fixture(scope="module")
def rag_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bridge]:
    """The `make run` pair (rag stub, streaming on), shared by the tests that only read answers."""
    stub = Stub("--mode", "rag")
    audit = tmp_path_factory.mktemp("openai") / "audit.sqlite3"
    try:
        bridge = Bridge(
            {
                "RAG_TARGET": stub.target,
                "ENABLE_SSE_STREAMING": "true",
                "AUDIT_DB": str(audit),
                "LOG_LEVEL": "WARNING",
                "RATE_LIMIT": "1000/minute",
            }
        )
    except BaseException:
        stub.stop()
        raise
    yield bridge
    bridge.stop()
    stub.stop()


@pytest.fixture
def slow_stub(stub_factory: StubFactory) -> Stub:
    """An answer long enough (200 echoes, 50 ms apart) to still be running when the test acts."""
    stub: Stub = stub_factory("--mode", "echo", "--token-delay-ms", "50", "--repeat", "200")
    return stub


# -- the official Python SDK: the answer and its sources --------------------------------------------


def test_sync_stream_answers_with_its_sources(rag_pair: Bridge) -> None:
    with sdk(rag_pair).chat.completions.create(model=MODEL, messages=MESSAGES, stream=True) as stream:
        chunks = list(stream)
        assert stream.response.headers["content-type"].startswith("text/event-stream")
    first, last = chunks[0], chunks[-1]
    assert first.choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:])
    sources = extension(first)["sources"]
    assert sources[0]["title"] == "B211A visit visa" and sources[0]["uri"] == B211A_URI
    assert extension(first)["model"] == "bali-zero-stub-1"
    assert last.choices[0].finish_reason == "stop"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert {c.id for c in chunks} == {f"chatcmpl-{extension(first)['stream_id']}"}
    answer = text_of(chunks)
    assert "B211A" in answer and "[1]" in answer
    # One token, one chunk: the answer the unary call gives, streamed.
    whole = sdk(rag_pair).chat.completions.create(model=MODEL, messages=MESSAGES)
    assert whole.choices[0].message.content == answer
    assert extension(whole)["sources"] == sources


async def test_async_stream_with_usage(rag_pair: Bridge) -> None:
    client = async_sdk(rag_pair)
    stream = await client.chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage is not None
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert usage.usage.completion_tokens == usage.usage.total_tokens == len(content_chunks)
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert extension(chunks[0])["sources"][0]["uri"] == B211A_URI
    await client.close()


async def test_async_whole_answer_with_its_sources(rag_pair: Bridge) -> None:
    client = async_sdk(rag_pair)
    completion = await client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "Answer from the sources."},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hello! Ask me about visas."},
            *MESSAGES,
        ],
    )
    await client.close()
    assert completion.object == "chat.completion" and completion.model == MODEL
    assert completion.choices[0].finish_reason == "stop"
    assert "B211A" in (completion.choices[0].message.content or "")
    assert extension(completion)["sources"][0]["uri"] == B211A_URI
    assert completion.usage is not None and completion.usage.completion_tokens > 10


def test_models_lists_what_model_accepts(stub_factory: StubFactory, bridge_factory: BridgeFactory) -> None:
    bridge = bridge_factory(stub_factory("--mode", "echo"), OPENAI_MODELS="bali-zero,bali-zero-fast")
    client = sdk(bridge)
    assert [m.id for m in client.models.list()] == ["bali-zero", "bali-zero-fast"]
    answer = client.chat.completions.create(model="bali-zero-fast", messages=[{"role": "user", "content": "a b"}])
    assert answer.choices[0].message.content == "a b" and answer.model == "bali-zero-fast"
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    assert (caught.value.code, caught.value.param, caught.value.type) == ("MODEL_NOT_FOUND", "model", "not_found_error")


# -- unsupported parameters: refused by name, never ignored ----------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"logprobs": True}, "logprobs"),
        ({"temperature": 0.2}, "temperature"),
        ({"max_tokens": 10}, "max_tokens"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, None),
    ],
    ids=["n", "tools", "logprobs", "temperature", "max_tokens", "image"],
)
def test_unsupported_parameters_are_400s_naming_them(
    rag_pair: Bridge, kwargs: dict[str, Any], param: str | None
) -> None:
    call: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "stream": True, **kwargs}
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(rag_pair).chat.completions.create(**call)
    error = caught.value
    assert error.code == "UNSUPPORTED_PARAMETER" and error.type == "invalid_request_error"
    assert error.param == (param or "messages[0].content[0].type")
    assert error.param is not None and error.param in error.message


def test_a_refusal_by_the_rag_service_is_an_http_error_in_openai_shape(
    stub_factory: StubFactory, bridge_factory: BridgeFactory
) -> None:
    """A gRPC status before any frame is answered over HTTP (the SDK's error of that status), on
    both the stream and the whole answer; the RAG service's own details stay in the log."""
    bridge = bridge_factory(stub_factory("--mode", "echo", "--max-query-bytes", "8"))
    client = sdk(bridge)
    long_question: list[Any] = [{"role": "user", "content": "a question longer than eight bytes"}]
    for stream in (True, False):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=MODEL, messages=long_question, stream=stream)
        assert caught.value.code == "INVALID_REQUEST", stream
        assert caught.value.message.endswith("the RAG service refused the request as invalid"), caught.value.message


def test_router_and_guard_errors_under_v1_are_in_openai_shape(rag_pair: Bridge) -> None:
    with httpx.Client(base_url=rag_pair.url, timeout=10) as client:
        for response, status in (
            (client.get("/v1/chat/completions"), 405),
            (client.get("/v1/embeddings"), 404),
            (client.get("/v1/models", headers={"x-padding": "x" * 33_000}), 431),  # the guard, not the wire
            (client.post("/v1/chat/completions", content=b"{", headers={"content-type": "application/json"}), 400),
            (client.post("/v1/chat/completions", content=b"{}", headers={"content-type": "text/plain"}), 415),
        ):
            assert response.status_code == status, response.text
            assert set(response.json()["error"]) == {"message", "type", "code", "param"}, response.text
        assert set(client.get("/api/v2/nothing").json()["error"]) == {"code", "message"}  # native elsewhere


# -- cancellation: closing the stream mid-answer cancels the upstream call ------------------------


def test_closing_the_sync_stream_mid_answer_cancels_upstream(slow_stub: Stub, bridge_factory: BridgeFactory) -> None:
    bridge = bridge_factory(slow_stub)
    request_id = new_request_id("close-sync")
    stream = sdk(bridge).chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, extra_headers={"x-request-id": request_id}
    )
    seen = 0
    for chunk in stream:
        seen += bool(chunk.choices and chunk.choices[0].delta.content)
        if seen == 3:
            stream.close()
            break
    ended = slow_stub.wait_for_end(request_id)
    assert ended["outcome"] == "cancelled", ended
    assert ended["tokens_sent"] < 100, ended


async def test_closing_the_async_stream_mid_answer_cancels_upstream(
    slow_stub: Stub, bridge_factory: BridgeFactory
) -> None:
    bridge = bridge_factory(slow_stub)
    request_id = new_request_id("close-async")
    client = async_sdk(bridge)
    stream = await client.chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, extra_headers={"x-request-id": request_id}
    )
    seen = 0
    async for chunk in stream:
        seen += bool(chunk.choices and chunk.choices[0].delta.content)
        if seen == 3:
            await stream.close()
            break
    ended = await slow_stub.ended(request_id)
    assert ended["outcome"] == "cancelled", ended
    await client.close()


# -- the gates ----------------------------------------------------------------------------------------


def test_rate_limit_is_the_sdks_rate_limit_error(stub_factory: StubFactory, bridge_factory: BridgeFactory) -> None:
    stub = stub_factory("--mode", "echo")
    bridge = bridge_factory(stub, RATE_LIMIT="2/minute")
    client = sdk(bridge)
    client.chat.completions.create(model=MODEL, messages=MESSAGES)
    with client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True) as stream:
        assert text_of(list(stream)) == QUESTION  # echo mode
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    error = caught.value
    assert (error.code, error.type) == ("RATE_LIMITED", "rate_limit_error")
    assert int(error.response.headers["retry-after"]) >= 1
    assert error.response.headers["ratelimit-remaining"] == "0"
    assert len(stub.stream_ends()) == 1  # the refused stream never reached the RAG service


def test_stream_cap_is_the_sdks_rate_limit_error(slow_stub: Stub, bridge_factory: BridgeFactory) -> None:
    bridge = bridge_factory(slow_stub, MAX_STREAMS_PER_USER="1")
    client = sdk(bridge)
    with client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True) as running:
        next(iter(running))
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
        assert caught.value.code == "TOO_MANY_STREAMS"
        assert int(caught.value.response.headers["retry-after"]) >= 1


def test_identity_comes_from_the_bearer_token(
    stub_factory: StubFactory, bridge_factory: BridgeFactory, tmp_path: Path
) -> None:
    """AUTH_REQUIRED: the SDK's api_key is the JWT. A bad one is the SDK's AuthenticationError;
    a good one streams, audited under its user, with the query HMAC the native stream gets."""
    db = tmp_path / "audit-jwt.sqlite3"
    stub = stub_factory("--mode", "echo")
    bridge = bridge_factory(stub, AUTH_REQUIRED="true", JWT_SECRET=JWT_SECRET, AUDIT_DB=str(db))
    with pytest.raises(openai.AuthenticationError) as caught:
        sdk(bridge, api_key="not-a-jwt").chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    assert caught.value.code == "INVALID_TOKEN" and caught.value.type == "authentication_error"
    assert caught.value.response.headers["www-authenticate"].startswith("Bearer")
    with pytest.raises(openai.AuthenticationError):
        sdk(bridge, api_key="unused").models.list()

    client = sdk(bridge, api_key=token("ann"))
    ids = {face: new_request_id(face) for face in ("openai-stream", "openai-whole", "native")}
    with client.chat.completions.create(
        model=MODEL, messages=MESSAGES, stream=True, extra_headers={"x-request-id": ids["openai-stream"]}
    ) as stream:
        list(stream)
    client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_headers={"x-request-id": ids["openai-whole"]})
    native = httpx.post(
        f"{bridge.url}/api/v2/bali-zero/chat-stream",
        json={"query": QUESTION},
        headers={"authorization": f"Bearer {token('ann')}", "x-request-id": ids["native"]},
        timeout=30,
    )
    assert native.status_code == 200
    bridge.stop()  # the lifespan flushes the audit queue
    records: dict[str, dict[str, dict[str, Any]]] = {}
    for record in exported(db):
        records.setdefault(record["request_id"], {})[record["event_type"]] = record
    assert set(records[ids["openai-stream"]]) == set(records[ids["native"]]) == {"stream_started", "stream_completed"}
    assert set(records[ids["openai-whole"]]) == {"chat"}
    hmacs = {r["query_hmac"] for events in records.values() for r in events.values() if r["request_id"] in ids.values()}
    assert len(hmacs) == 1  # the same keyed hash of the same query, whatever the face
    assert {r["user_id"] for events in records.values() for r in events.values()} >= {"ann"}
    assert records[ids["openai-stream"]]["stream_started"]["identity_kind"] == "token"


@pytest.mark.parametrize(
    "env", [{"ENABLE_SSE_STREAMING": "false"}, {"SSE_ROLLOUT_PERCENT": "0"}], ids=["flag-off", "rollout-0"]
)
def test_the_streaming_flag_and_rollout_apply(
    stub_factory: StubFactory, bridge_factory: BridgeFactory, env: dict[str, str]
) -> None:
    bridge = bridge_factory(stub_factory("--mode", "echo"), **env)
    client = sdk(bridge)
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    assert caught.value.code == "STREAMING_DISABLED" and "stream: false" in caught.value.message
    # The whole answer works whatever the flag, like POST /api/v2/bali-zero/chat.
    assert client.chat.completions.create(model=MODEL, messages=MESSAGES).choices[0].message.content


def test_heartbeats_are_comments_the_sdk_skips(stub_factory: StubFactory, bridge_factory: BridgeFactory) -> None:
    stub = stub_factory("--mode", "echo", "--first-token-delay-ms", "400")
    bridge = bridge_factory(stub, HEARTBEAT_INTERVAL_S="0.05")
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "quiet then spoken"}],
        "stream": True,
    }
    raw = httpx.post(f"{bridge.url}/v1/chat/completions", json=body, timeout=30).content
    assert b"\n: keep-alive\n\n" in raw or raw.startswith(b": keep-alive\n\n")
    assert b"heartbeat" not in raw and b"\nid:" not in raw and not raw.startswith(b"id:")
    data = [event.data for event in Parser().feed(raw)]  # comments are skipped by every SSE parser
    assert data[-1] == "[DONE]" and all(json.loads(d)["object"] == "chat.completion.chunk" for d in data[:-1])
    with sdk(bridge).chat.completions.create(model=MODEL, messages=body["messages"], stream=True) as stream:
        assert text_of(list(stream)) == "quiet then spoken"


def test_a_mid_stream_failure_is_the_sdks_api_error(stub_factory: StubFactory, bridge_factory: BridgeFactory) -> None:
    stub = stub_factory("--mode", "echo", "--fail-after", "2")
    bridge = bridge_factory(stub)
    seen: list[str] = []
    with (
        pytest.raises(openai.APIError) as caught,
        sdk(bridge).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "one two three four"}], stream=True
        ) as stream,
    ):
        seen.extend(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert "".join(seen).strip() == "one two"
    assert caught.value.code == "UPSTREAM_UNAVAILABLE" and caught.value.type == "server_error"
    assert "127.0.0.1" not in caught.value.message  # the fixed client message, as on the native face


def test_sigterm_drains_then_ends_the_stream_with_an_error_the_sdk_raises(
    slow_stub: Stub, bridge_factory: BridgeFactory
) -> None:
    bridge = bridge_factory(slow_stub, SHUTDOWN_GRACE_S="0.5", LOG_LEVEL="INFO")
    client = sdk(bridge)
    with client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True) as stream:
        chunks = iter(stream)
        next(chunks)
        bridge.signal(signal.SIGTERM)
        with pytest.raises(openai.APIError) as caught:
            for _ in chunks:
                pass
    assert caught.value.code == "SHUTTING_DOWN"
    assert bridge.wait(30) == 0
    bridge.stop()
    assert "Traceback" not in "\n".join(bridge.stderr_lines)


async def test_the_stream_span_has_its_first_token(stub_factory: StubFactory, bridge_factory: BridgeFactory) -> None:
    traceparent, trace_id, parent_id = new_traceparent()
    request_id = new_request_id("trace")
    with TraceReceiver() as receiver:
        stub = stub_factory("--mode", "echo", env=otel_env(receiver, "rag-stub"))
        bridge = bridge_factory(stub, LOG_LEVEL="INFO", **otel_env(receiver, "bali-zero-bridge"))
        client = async_sdk(bridge)
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "one trace for the openai face"}],
            stream=True,
            extra_headers={"traceparent": traceparent, "x-request-id": request_id},
        )
        chunks = [chunk async for chunk in stream]
        await client.close()
        ended = await bridge_stream_end(bridge, request_id)
        await stop_all(bridge, stub)
        spans = receiver.wait_until(has_stream_trio(trace_id))
    chain = stream_trace(spans, trace_id)
    assert chain.bridge.parent_span_id == parent_id
    assert chain.bridge.attributes["outcome"] == "completed"
    assert chain.bridge.attributes["tokens"] == len([c for c in chunks if c.choices and c.choices[0].delta.content])
    (first_token,) = [e for e in chain.bridge.events if e.name == "first_token"]
    assert chain.bridge.start_time_unix_nano <= first_token.time_unix_nano <= chain.bridge.end_time_unix_nano
    assert ended["trace_id"] == trace_id


def test_metrics_count_the_openai_streams(stub_factory: StubFactory, bridge_factory: BridgeFactory) -> None:
    bridge = bridge_factory(stub_factory("--mode", "echo"))
    with sdk(bridge).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "a b c"}], stream=True
    ) as stream:
        list(stream)
    deadline = time.monotonic() + 10
    while True:  # the stream's end is counted once its final chunk was written
        samples = metric_samples(httpx.get(f"{bridge.url}/metrics", timeout=10).text)
        if (
            sample(samples, "bridge_streams_total", outcome="completed", error_code="") == 1
            or time.monotonic() > deadline
        ):
            break
        time.sleep(0.05)
    assert sample(samples, "bridge_streams_total", outcome="completed", error_code="") == 1
    assert sample(samples, "bridge_tokens_total") == 3
    assert sample(samples, "bridge_first_token_seconds_count") == 1
    assert sample(samples, "bridge_open_streams") == 0


# -- an attack: taking over another face's stream -------------------------------------------------


def test_resuming_an_openai_stream_on_the_native_route_gets_the_unknown_id_answer(
    stub_factory: StubFactory, bridge_factory: BridgeFactory
) -> None:
    """A stream of the OpenAI face has no resume: a ``Last-Event-ID`` naming it, even at the exact
    frame its reader is at, must not attach to it (the native reader would take over its frames
    and the SDK's reader would stop); it gets the answer of an unknown id."""
    stub = stub_factory("--mode", "echo", "--token-delay-ms", "400", "--repeat", "20")
    bridge = bridge_factory(stub, RESUME_GRACE_S="30")
    with sdk(bridge).chat.completions.create(model=MODEL, messages=MESSAGES, stream=True) as stream:
        chunks = iter(stream)
        stream_id = extension(next(chunks))["stream_id"]  # frame 1: the metadata
        assert next(chunks).choices[0].delta.content  # frame 2: the first token; the next is 400 ms away
        parser = Parser()
        with httpx.stream(
            "GET",
            f"{bridge.url}/api/v2/bali-zero/chat-stream",
            headers={"last-event-id": f"{stream_id}:2"},
            timeout=10,
        ) as resumed:
            events = []
            for raw in resumed.iter_raw():
                events += parser.feed(raw)
                if events:
                    break
        frame = json.loads(events[0].data)
        assert frame.get("type") == "error" and frame.get("code") == "STREAM_EXPIRED", frame
        assert next(chunks).choices[0].delta.content  # the SDK's reader kept its stream


@pytest.mark.redis
@pytest.mark.parametrize("pair", ["two instances"], indirect=True)
async def test_resuming_an_openai_stream_on_another_instance_gets_the_unknown_id_answer(
    stub_factory: StubFactory,
    pair: Pair,  # noqa: F811
    redis_server: str,  # noqa: F811
) -> None:
    """With a shared resume store, an OpenAI stream is neither claimed nor mirrored: another
    instance has nothing to serve for its id (which would hand its frames to whoever names it)."""
    stub = stub_factory("--mode", "echo", "--token-delay-ms", "200", "--repeat", "20")
    owner, other = pair(stub)
    client = async_sdk(owner)
    store = redis.asyncio.Redis.from_url(redis_server)
    try:
        stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
        chunks = stream.__aiter__()
        stream_id = extension(await chunks.__anext__())["stream_id"]
        assert (await chunks.__anext__()).choices[0].delta.content
        assert not await store.exists(f"bzb:meta:{stream_id}")  # a claim is stored before any frame leaves
        async with httpx.AsyncClient(base_url=other.url, timeout=10) as native:
            resumed = await native.get("/api/v2/bali-zero/chat-stream", headers={"last-event-id": f"{stream_id}:2"})
        (frame,) = [json.loads(e.data) for e in Parser().feed(resumed.content)]
        assert frame["type"] == "error" and frame["code"] == "STREAM_EXPIRED", frame
        await stream.close()
    finally:
        await client.close()
        await store.aclose()


# -- LangChain and node ---------------------------------------------------------------------------


class BaliZeroChat(ChatOpenAI):
    """``ChatOpenAI`` keeping the ``bali_zero`` field (the sources) in ``response_metadata``.

    LangChain keeps only the chunk fields it knows, so the sources need this one override; the
    answer itself streams with the plain ``ChatOpenAI``.
    """

    def _convert_chunk_to_generation_chunk(
        self, chunk: dict[str, Any], default_chunk_class: type, base_generation_info: dict[str, Any] | None
    ) -> Any:
        generation = super()._convert_chunk_to_generation_chunk(chunk, default_chunk_class, base_generation_info)
        if generation is not None and "bali_zero" in chunk:
            generation.message.response_metadata["bali_zero"] = chunk["bali_zero"]
        return generation


def test_langchain_chat_openai_streams_the_answer(rag_pair: Bridge) -> None:
    plain = ChatOpenAI(model=MODEL, base_url=f"{rag_pair.url}/v1", api_key=SecretStr("unused"), max_retries=0)
    parts = list(plain.stream(QUESTION))
    assert all(isinstance(p, AIMessageChunk) for p in parts)
    answer = "".join(str(p.content) for p in parts)
    assert "B211A" in answer and "[1]" in answer
    merged = functools.reduce(operator.add, parts)  # the message LangChain assembles from the chunks
    assert merged.response_metadata["finish_reason"] == "stop" and merged.response_metadata["model_name"] == MODEL
    with_sources = BaliZeroChat(model=MODEL, base_url=f"{rag_pair.url}/v1", api_key=SecretStr("unused"), max_retries=0)
    first, *rest = with_sources.stream(QUESTION)
    assert first.response_metadata["bali_zero"]["sources"][0]["uri"] == B211A_URI
    assert "".join(str(p.content) for p in [first, *rest]) == answer


def test_the_openai_npm_package_streams_under_node(rag_pair: Bridge) -> None:
    require_binary("node", "nodejs")
    if not (ROOT / "node_modules" / "openai").is_dir():
        message = "node_modules/openai is missing (make test runs npm ci)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    request_id = new_request_id("node-abort")
    done = subprocess.run(
        ["node", "--test", "tests/js/openai_sdk.test.mjs"],
        cwd=ROOT,
        env={**os.environ, "BRIDGE_URL": rag_pair.url, "CANCEL_REQUEST_ID": request_id},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "# fail 0" in done.stdout and "# skipped 0" in done.stdout and "# pass 4" in done.stdout


def test_the_node_abort_cancelled_upstream(stub_factory: StubFactory, bridge_factory: BridgeFactory) -> None:
    """The npm client's ``controller.abort()`` mid-answer cancels the gRPC call (the stub says so)."""
    require_binary("node", "nodejs")
    if not (ROOT / "node_modules" / "openai").is_dir():
        pytest.skip("node_modules/openai is missing")
    stub = stub_factory("--mode", "rag", "--token-delay-ms", "30")
    bridge = bridge_factory(stub)
    request_id = new_request_id("node-abort")
    done = subprocess.run(
        ["node", "--test", "--test-name-pattern", "aborting", "tests/js/openai_sdk.test.mjs"],
        cwd=ROOT,
        env={**os.environ, "BRIDGE_URL": bridge.url, "CANCEL_REQUEST_ID": request_id},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    ended = stub.wait_for_end(request_id)
    assert ended["outcome"] == "cancelled", ended
