"""In-process unit tests of the OpenAI mapping (bridge/openai_compat.py): requests, chunks, errors.

The shapes are checked against the official ``openai`` package's own types, so "compatible" means
what the SDK parses, not what this file believes; the SDKs against a running bridge are in
tests/e2e/test_openai_clients.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai.types import Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from bali_zero.rag.v1 import rag_pb2
from bridge import errors, sse
from bridge.errors import BadRequest, BridgeError, NotFound, ServiceUnavailable, TooManyRequests
from bridge.inputs import Limits
from bridge.openai_compat import (
    DONE,
    EXTENSION_FIELD,
    KEEP_ALIVE,
    ChatCompletionChunks,
    OpenAIFace,
    completion_body,
    models_body,
    parse_request,
)
from bridge.stream.frames import MAX_SOURCES
from bridge.types import StreamResult

LIMITS = Limits(max_query_bytes=64, max_body_bytes=4096, max_history_messages=3)
MODELS = ("bali-zero", "bali-zero-large")
QUESTION = {"role": "user", "content": "What is the B211A visa?"}


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "bali-zero", "messages": [QUESTION], **fields}


def refusal(data: dict[str, Any]) -> BridgeError:
    with pytest.raises(BridgeError) as caught:
        parse_request(data, LIMITS, MODELS)
    return caught.value


# -- requests -------------------------------------------------------------------------------------


def test_the_last_message_is_the_query_and_the_earlier_ones_the_history() -> None:
    asked = parse_request(
        body(
            messages=[
                {"role": "developer", "content": "Answer briefly."},
                {"role": "user", "content": "Hi"},
                {
                    "role": "assistant",
                    "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "ask"}],
                },
                QUESTION,
            ]
        ),
        LIMITS,
        MODELS,
    )
    assert asked.chat.query == "What is the B211A visa?"
    assert asked.chat.history == (("system", "Answer briefly."), ("user", "Hi"), ("assistant", "Hello, ask"))
    assert (asked.model, asked.stream, asked.include_usage) == ("bali-zero", False, False)
    assert asked.chat.user_email is None and asked.chat.user_role is None


def test_stream_and_usage_options_are_read() -> None:
    asked = parse_request(body(stream=True, stream_options={"include_usage": True}, n=1), LIMITS, MODELS)
    assert (asked.stream, asked.include_usage) == (True, True)
    assert parse_request(body(stream=None, n=None, stream_options=None), LIMITS, MODELS).stream is False


@pytest.mark.parametrize(
    "name",
    [
        *("tools", "tool_choice", "functions", "logprobs", "top_logprobs", "temperature", "top_p", "max_tokens"),
        *("seed", "stop", "response_format", "user", "presence_penalty", "frequency_penalty", "logit_bias", "nope"),
    ],
)
def test_an_unsupported_parameter_is_refused_naming_it(name: str) -> None:
    error = refusal(body(**{name: None}))
    assert (error.status, error.code, error.param) == (400, "UNSUPPORTED_PARAMETER", name)
    assert error.message.startswith(name)


@pytest.mark.parametrize("n", [2, 0, True, "1", 1.0])
def test_more_than_one_choice_is_refused(n: Any) -> None:
    error = refusal(body(n=n))
    assert (error.status, error.param) == (400, "n")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream: true
        ({"stream": True, "stream_options": {"include_obfuscation": False}}, "stream_options.include_obfuscation"),
        ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
        ({"stream": True, "stream_options": []}, "stream_options"),
        ({"stream": "true"}, "stream"),
    ],
)
def test_stream_options_are_checked(fields: dict[str, Any], param: str) -> None:
    error = refusal(body(**fields))
    assert (error.status, error.param) == (400, param)


def test_the_model_must_be_listed() -> None:
    unknown = refusal(body(model="gpt-4o"))
    assert (unknown.status, unknown.code, unknown.param) == (404, "MODEL_NOT_FOUND", "model")
    assert "gpt-4o" not in unknown.message  # fixed text: the client's value is never echoed
    missing = refusal({"messages": [QUESTION]})
    assert (missing.status, missing.param) == (400, "model")
    assert parse_request(body(model="bali-zero-large"), LIMITS, MODELS).model == "bali-zero-large"


@pytest.mark.parametrize(
    ("messages", "param", "code"),
    [
        (None, "messages", "INVALID_REQUEST"),
        ([], "messages", "INVALID_REQUEST"),
        ("hi", "messages", "INVALID_REQUEST"),
        (["hi"], "messages[0]", "INVALID_REQUEST"),
        ([{"role": "assistant", "content": "hi"}], "messages[0].role", "INVALID_REQUEST"),
        ([{"role": "tool", "content": "x", "tool_call_id": "c"}], "messages[0].tool_call_id", "UNSUPPORTED_PARAMETER"),
        ([{"role": "tool", "content": "x"}], "messages[0].role", "UNSUPPORTED_PARAMETER"),
        ([{"role": 7, "content": "x"}], "messages[0].role", "INVALID_REQUEST"),
        ([{"role": "user", "content": "x", "name": "ann"}], "messages[0].name", "UNSUPPORTED_PARAMETER"),
        ([{"role": "user", "content": None}], "messages[0].content", "INVALID_REQUEST"),
        ([{"role": "user", "content": "   "}], "messages[0].content", "QUERY_REQUIRED"),
        ([{"role": "user", "content": "x" * 65}], "messages[0].content", "QUERY_TOO_LONG"),
        ([{"role": "user", "content": "\ud800"}], "messages[0].content", "INVALID_REQUEST"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            "messages[0].content[0].type",
            "UNSUPPORTED_PARAMETER",
        ),
        ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0]", "INVALID_REQUEST"),
        ([{"role": "user", "content": ""}, QUESTION], "messages[0].content", "INVALID_HISTORY"),
        ([{"role": "user", "content": "\udfff"}, QUESTION], "messages[0].content", "INVALID_REQUEST"),
        ([QUESTION] * 5, "messages", "INVALID_HISTORY"),  # the question and 4 earlier turns: over 3
    ],
)
def test_messages_are_checked_like_the_native_history(messages: Any, param: str, code: str) -> None:
    error = refusal({"model": "bali-zero", "messages": messages})
    assert (error.status, error.param, error.code) == (400, param, code), error.message
    assert error.message.startswith(param.split("[")[0])


def test_the_history_limit_is_the_native_one() -> None:
    assert len(parse_request(body(messages=[QUESTION] * 4), LIMITS, MODELS).chat.history) == LIMITS.max_history_messages


# -- the stream's chunks --------------------------------------------------------------------------


def events(raw: bytes) -> list[str]:
    """The data of each event, as an SSE parser dispatches them (comments skipped)."""
    return [event.data for event in sse.Parser().feed(raw)]


def chunk(data: str) -> ChatCompletionChunk:
    return ChatCompletionChunk.model_validate(json.loads(data))


def meta(n: int = 2) -> rag_pb2.Metadata:
    return rag_pb2.Metadata(
        model="bali-zero-stub-1",
        sources=[rag_pb2.Source(title=f"doc {i}", uri=f"corpus://d{i}", score=1.0 / (i + 1)) for i in range(n)],
    )


def result(tokens: int, finish_reason: str | None = "stop") -> StreamResult:
    return StreamResult("s1", "r1", "completed", tokens, 10.0, 1.0, None, finish_reason)


def test_a_whole_stream_is_what_the_sdk_parses() -> None:
    chunks = ChatCompletionChunks("s1", "r1", "bali-zero", include_usage=True, created=1700000000)
    raw = (
        chunks.metadata(1, meta())
        + chunks.token(2, 0, rag_pb2.Token(text="B211A "))
        + chunks.token(3, 1, rag_pb2.Token(text='"quoted"\n\nid: 9\r\ndata: x'))
        + chunks.done(4, result(2))
    )
    data = events(raw)
    assert data[-1] == "[DONE]" and raw.endswith(DONE)
    parsed = [chunk(d) for d in data[:-1]]
    first, *tokens, finish, usage = parsed
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    extension = (first.model_extra or {})[EXTENSION_FIELD]
    assert extension["sources"][0] == {"title": "doc 0", "uri": "corpus://d0", "score": 1.0}
    assert extension["model"] == "bali-zero-stub-1" and extension["request_id"] == "r1"
    assert [t.choices[0].delta.content for t in tokens] == ["B211A ", '"quoted"\n\nid: 9\r\ndata: x']
    assert all(t.choices[0].delta.role is None and t.choices[0].finish_reason is None for t in tokens)
    assert finish.choices[0].finish_reason == "stop" and finish.choices[0].delta.content is None
    assert usage.choices == [] and usage.usage is not None
    assert (usage.usage.completion_tokens, usage.usage.total_tokens) == (2, 2)
    assert {c.id for c in parsed} == {"chatcmpl-s1"} and {c.model for c in parsed} == {"bali-zero"}
    assert {c.created for c in parsed} == {1700000000}
    assert all(json.loads(d)["usage"] is None for d in data[:-2])  # include_usage: null until the last


def test_without_usage_no_usage_field_and_no_usage_chunk() -> None:
    chunks = ChatCompletionChunks("s1", "r1", "bali-zero", include_usage=False)
    data = events(chunks.token(1, 0, rag_pb2.Token(text="a")) + chunks.done(2, result(1, "length")))
    assert data[-1] == "[DONE]" and len(data) == 3
    assert all("usage" not in json.loads(d) for d in data[:-1])
    assert chunk(data[1]).choices[0].finish_reason == "length"


def test_the_first_chunk_carries_the_role_whatever_it_is() -> None:
    """A RAG service that sends no metadata: the first token has ``role``; an empty answer: the end."""
    chunks = ChatCompletionChunks("s1", "r1", "bali-zero", include_usage=False)
    first, second = (
        chunk(d)
        for d in events(chunks.token(1, 0, rag_pb2.Token(text="a")) + chunks.token(2, 1, rag_pb2.Token(text="b")))
    )
    assert first.choices[0].delta.role == "assistant" and second.choices[0].delta.role is None
    empty = ChatCompletionChunks("s2", "r2", "bali-zero", include_usage=False)
    (finish, done) = events(empty.done(1, result(0, None)))
    assert chunk(finish).choices[0].delta.role == "assistant" and chunk(finish).choices[0].finish_reason == "stop"
    assert done == "[DONE]"


def test_the_sources_are_capped_like_the_native_frame() -> None:
    chunks = ChatCompletionChunks("s1", "r1", "bali-zero", include_usage=False)
    (data,) = events(chunks.metadata(1, meta(MAX_SOURCES + 5)))
    assert len(json.loads(data)[EXTENSION_FIELD]["sources"]) == MAX_SOURCES


def test_a_mid_stream_error_is_the_error_object_the_sdks_raise() -> None:
    chunks = ChatCompletionChunks("s1", "r1", "bali-zero", include_usage=False)
    error = ServiceUnavailable("the bridge is shutting down", code="SHUTTING_DOWN", retryable=True, retry_after_s=1)
    (data,) = events(chunks.error(3, error))
    assert json.loads(data) == {
        "error": {
            "message": "the bridge is shutting down",
            "type": "server_error",
            "code": "SHUTTING_DOWN",
            "param": None,
        }
    }


def test_the_face_heartbeat_is_a_comment_no_client_dispatches() -> None:
    face = OpenAIFace("bali-zero", include_usage=False)
    assert face.heartbeat("s1", 7) == KEEP_ALIVE
    assert events(KEEP_ALIVE) == []
    assert not face.resumable and not face.encoder("s1", "r1").resumable


def test_a_model_id_is_json_escaped_in_the_hot_path() -> None:
    chunks = ChatCompletionChunks("s1", "r1", 'a"b\\c', include_usage=False)
    (data,) = events(chunks.token(1, 0, rag_pb2.Token(text="x")))
    assert chunk(data).model == 'a"b\\c'


# -- non-streaming and models ---------------------------------------------------------------------


def test_the_whole_completion_is_what_the_sdk_parses() -> None:
    reply = rag_pb2.ChatResponse(
        answer="The B211A is a visit visa. [1]",
        metadata=meta(1),
        completion=rag_pb2.Completion(finish_reason=rag_pb2.FINISH_REASON_LENGTH, token_count=7),
    )
    completion = ChatCompletion.model_validate(completion_body(reply, "bali-zero", "r9"))
    assert completion.choices[0].message.content == "The B211A is a visit visa. [1]"
    assert completion.choices[0].message.role == "assistant" and completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 7
    extension = (completion.model_extra or {})[EXTENSION_FIELD]
    assert extension["sources"] == [{"title": "doc 0", "uri": "corpus://d0", "score": 1.0}]
    assert extension["request_id"] == "r9" and completion.model == "bali-zero"


def test_models_lists_every_configured_id() -> None:
    listed = models_body(MODELS)
    assert listed["object"] == "list"
    assert [Model.model_validate(m).id for m in listed["data"]] == list(MODELS)


# -- the OpenAI rendering of the one error tree ---------------------------------------------------


def test_every_bridge_error_has_an_openai_rendering() -> None:
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, BridgeError)]
    assert len(classes) >= 10
    for cls in classes:
        rendered = cls("message").openai_body()
        assert set(rendered) == {"error"} and set(rendered["error"]) == {"message", "type", "code", "param"}
        assert rendered["error"]["code"] == cls("message").code


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (BadRequest("x"), "invalid_request_error"),
        (errors.Unauthorized("x"), "authentication_error"),
        (errors.Forbidden("x"), "permission_error"),
        (NotFound("x"), "not_found_error"),
        (errors.PayloadTooLarge("x"), "invalid_request_error"),
        (TooManyRequests("x", retry_after_s=3), "rate_limit_error"),
        (ServiceUnavailable("x"), "server_error"),
        (errors.UpstreamError("x"), "server_error"),
    ],
)
def test_the_openai_type_follows_the_status(error: BridgeError, kind: str) -> None:
    assert error.openai_body()["error"]["type"] == kind


def test_the_native_body_is_unchanged_by_param() -> None:
    error = BadRequest("n must be 1", param="n")
    assert error.body() == {"error": {"code": "INVALID_REQUEST", "message": "n must be 1"}}
    assert error.openai_body()["error"]["param"] == "n"
