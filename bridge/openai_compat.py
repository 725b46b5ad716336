"""The OpenAI-compatible face: ``POST /v1/chat/completions`` and ``GET /v1/models``, mapped here.

Only the mapping lives here; the gate, the stream and the unary call are the bridge's own
(bridge/endpoints.py opens the stream through bridge/stream/opener.py with ``OpenAIFace``).

The request: ``messages`` → the query (the last message, which must be the user's) and the
conversation history (the earlier turns, under the checks of ``conversation_history``:
bridge/inputs.py); ``model`` must be one of OPENAI_MODELS (what ``GET /v1/models`` lists);
``stream``, ``stream_options.include_usage`` and ``n: 1`` are understood. Any other parameter is
refused with a 400 naming it: a client that asked for ``tools`` or ``temperature`` must learn it
did not get them, not receive an answer that silently ignored them.

The stream: each gRPC message is encoded once, as it arrives, as a ``chat.completion.chunk``
event: the RAG metadata as the first chunk (``delta.role``, and the sources in the extension
field ``bali_zero`` that standard clients ignore), each token as one chunk
(``choices[0].delta.content``), the end as a chunk with ``finish_reason``, the usage chunk when
asked for, then ``data: [DONE]``. A failure mid-stream is ``data: {"error": {...}}``, which the
OpenAI SDKs raise as an API error; heartbeats are the SSE comment ``: keep-alive``, which every
SSE parser skips. Errors over HTTP are ``{"error": {"message", "type", "code", "param"}}``
(``BridgeError.openai_body``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring
from typing import Any, ClassVar

from starlette.responses import Response

from bali_zero.rag.v1 import rag_pb2
from bridge.errors import BadRequest, BridgeError, JSONResponse, NotFound
from bridge.errors import error_response as native_error_response
from bridge.inputs import ChatInput, Limits, check_history, check_query
from bridge.stream.frames import StreamEncoder, finish_reason, new_stream_id, sources
from bridge.types import StreamResult

PATH_PREFIX = "/v1/"
CHAT_COMPLETIONS_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"

EXTENSION_FIELD = "bali_zero"
"""The field of a chunk (the first) and of a completion that carries the RAG sources."""

OWNED_BY = "bali-zero"
KEEP_ALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"

SUPPORTED_PARAMETERS = frozenset({"model", "messages", "stream", "stream_options", "n"})
MESSAGE_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
"""An OpenAI message role → the RAG service's (``developer`` is the newer name of ``system``)."""


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    """A checked ``POST /v1/chat/completions`` body."""

    model: str
    stream: bool
    include_usage: bool
    chat: ChatInput


def unsupported(name: str) -> BadRequest:
    return BadRequest(
        f"{name} is not supported by this API: the Bali Zero RAG service answers from its sources, "
        "with one choice and no tools (see the OpenAI-compatible API in the docs)",
        code="UNSUPPORTED_PARAMETER",
        param=name,
    )


def parse_request(data: Mapping[str, Any], limits: Limits, models: Sequence[str]) -> CompletionRequest:
    """Check a request body; every refusal is a ``BridgeError`` naming the parameter at fault.

    In order: unknown or unsupported parameters (400 ``UNSUPPORTED_PARAMETER``), ``model``
    (404 ``MODEL_NOT_FOUND`` when not listed), ``n``, ``stream``, ``stream_options``, then the
    messages, with the same limits as the native endpoints' query and history.
    """
    for name in data:
        if name not in SUPPORTED_PARAMETERS:
            raise unsupported(name)
    model = _model(data.get("model"), models)
    n = data.get("n")
    if n is not None and (type(n) is not int or n != 1):  # not isinstance: True == 1
        raise BadRequest("n must be 1: this API answers with one choice", code="UNSUPPORTED_PARAMETER", param="n")
    stream = data.get("stream")
    if stream is None:
        stream = False
    elif not isinstance(stream, bool):
        raise BadRequest("stream must be true or false", param="stream")
    include_usage = _include_usage(data.get("stream_options"), stream)
    return CompletionRequest(model, stream, include_usage, _chat(data.get("messages"), limits))


def _model(model: Any, models: Sequence[str]) -> str:
    if not isinstance(model, str) or not model:
        raise BadRequest("model is required: one of the ids GET /v1/models lists", param="model")
    if model not in models:
        # The id is not echoed: a message stays a fixed text, whatever the client sent.
        raise NotFound(
            "this model does not exist here: GET /v1/models lists the ones served",
            code="MODEL_NOT_FOUND",
            param="model",
        )
    return model


def _include_usage(options: Any, stream: bool) -> bool:
    if options is None:
        return False
    if not stream:
        raise BadRequest("stream_options is only allowed with stream: true", param="stream_options")
    if not isinstance(options, dict):
        raise BadRequest("stream_options must be an object", param="stream_options")
    for name in options:
        if name != "include_usage":
            raise unsupported(f"stream_options.{name}")
    include = options.get("include_usage")
    if include is not None and not isinstance(include, bool):
        raise BadRequest("stream_options.include_usage must be true or false", param="stream_options.include_usage")
    return bool(include)


def _chat(messages: Any, limits: Limits) -> ChatInput:
    """The last message is the question; the earlier ones are the history (at most
    MAX_HISTORY_MESSAGES of them, each checked like ``conversation_history``)."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list of {role, content}", param="messages")
    if len(messages) - 1 > limits.max_history_messages:
        raise BadRequest(
            f"messages holds more than the question and {limits.max_history_messages} earlier turns",
            code="INVALID_HISTORY",
            param="messages",
        )
    turns = [_turn(i, message) for i, message in enumerate(messages)]
    last = len(turns) - 1
    role, question = turns[last]
    if role != "user":
        where = f"messages[{last}].role"
        raise BadRequest(f"{where} must be user: the last message is the question", param=where)
    query = check_query(question, limits, f"messages[{last}].content")
    history = check_history([{"role": r, "content": c} for r, c in turns[:last]], limits, "messages")
    return ChatInput(query, history=history)


def _turn(i: int, message: Any) -> tuple[str, str]:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise BadRequest(f"{where} must be an object with role and content", param=where)
    for name in message:
        if name not in ("role", "content"):
            raise unsupported(f"{where}.{name}")
    role = message.get("role")
    if role not in MESSAGE_ROLES:
        raise BadRequest(
            f"{where}.role must be one of {', '.join(MESSAGE_ROLES)}",
            code="UNSUPPORTED_PARAMETER" if isinstance(role, str) else "INVALID_REQUEST",
            param=f"{where}.role",
        )
    return MESSAGE_ROLES[role], _text(message.get("content"), f"{where}.content")


def _text(content: Any, where: str) -> str:
    """A message's text: a string, or a list of ``{"type": "text", "text"}`` parts (joined)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest(f"{where} must be a string or a list of text parts", param=where)
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("text"), str) or set(part) != {"type", "text"}:
            if isinstance(part, dict) and part.get("type") != "text":
                raise unsupported(f"{where}[{j}].type")
            raise BadRequest(f"{where}[{j}] must be {{type: text, text}}", param=f"{where}[{j}]")
        if part["type"] != "text":
            raise unsupported(f"{where}[{j}].type")
        texts.append(part["text"])
    return "".join(texts)


def usage(completion_tokens: int) -> dict[str, int]:
    """The ``usage`` object. The bridge counts the answer's tokens as the RAG service streamed
    them; it cannot count the question's (the RAG service's tokenizer is its own), so
    ``prompt_tokens`` is 0."""
    return {"prompt_tokens": 0, "completion_tokens": completion_tokens, "total_tokens": completion_tokens}


def _json(payload: object) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


def _event(payload: object) -> bytes:
    """One SSE event of JSON data (``json.dumps`` escapes CR and LF: a value cannot end it early)."""
    return f"data: {_json(payload)}\n\n".encode()


class ChatCompletionChunks:
    """The ``chat.completion.chunk`` events of one stream (a ``StreamEncoder``).

    The first chunk sent carries ``delta.role``. A token's chunk is one concatenation around the
    token's JSON text (the hot path builds no dict); the other chunks are dicts, once per stream.
    Not resumable: the events carry no ids.
    """

    resumable: ClassVar[bool] = False

    __slots__ = ("_created", "_first", "_head", "_tail", "include_usage", "model", "request_id", "stream_id")

    def __init__(
        self, stream_id: str, request_id: str, model: str, include_usage: bool, created: int | None = None
    ) -> None:
        self.stream_id = stream_id
        self.request_id = request_id
        self.model = model
        self.include_usage = include_usage
        self._created = int(time.time()) if created is None else created
        self._head = (
            f'data: {{"id":"chatcmpl-{stream_id}","object":"chat.completion.chunk","created":{self._created},'
            f'"model":{encode_basestring(model)},"choices":[{{"index":0,"delta":{{'
        )
        self._tail = '},"logprobs":null,"finish_reason":null}]' + (',"usage":null' if include_usage else "") + "}\n\n"
        self._first = True

    def _delta(self, **fields: str) -> dict[str, str]:
        """A delta, with ``role`` in the first chunk sent."""
        if self._first:
            self._first = False
            return {"role": "assistant", **fields}
        return fields

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        chunk: dict[str, Any] = {
            "id": f"chatcmpl-{self.stream_id}",
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = None
        chunk.update(extra)
        return _event(chunk)

    def token(self, seq: int, index: int, token: rag_pb2.Token) -> bytes:
        if self._first:
            self._first = False
            return f'{self._head}"role":"assistant","content":{encode_basestring(token.text)}{self._tail}'.encode()
        return f'{self._head}"content":{encode_basestring(token.text)}{self._tail}'.encode()

    def metadata(self, seq: int, meta: rag_pb2.Metadata) -> bytes:
        """The RAG sources, in the extension field of a chunk with no text (the first one sent)."""
        choice = {"index": 0, "delta": self._delta(content=""), "logprobs": None, "finish_reason": None}
        extension = {
            "sources": sources(meta),
            "model": meta.model,
            "request_id": self.request_id,
            "stream_id": self.stream_id,
        }
        return self._chunk([choice], **{EXTENSION_FIELD: extension})

    def done(self, seq: int, result: StreamResult) -> bytes:
        """The chunk with ``finish_reason``, the usage chunk when asked for, then ``[DONE]``."""
        choice = {"index": 0, "delta": self._delta(), "logprobs": None, "finish_reason": result.finish_reason or "stop"}
        last = self._chunk([choice])
        if self.include_usage:
            last += self._chunk([], usage=usage(result.tokens))
        return last + DONE

    def error(self, seq: int, error: BridgeError) -> bytes:
        """The error as OpenAI clients parse it mid-stream (no ``[DONE]`` after it)."""
        return _event(error.openai_body())


class OpenAIFace:
    """The stream face of ``POST /v1/chat/completions`` with ``stream: true`` (bridge/stream/face.py)."""

    resumable: ClassVar[bool] = False

    __slots__ = ("include_usage", "model")

    def __init__(self, model: str, include_usage: bool) -> None:
        self.model = model
        self.include_usage = include_usage

    def encoder(self, stream_id: str, request_id: str) -> StreamEncoder:
        return ChatCompletionChunks(stream_id, request_id, self.model, self.include_usage)

    def heartbeat(self, stream_id: str, sent_seq: int) -> bytes:
        return KEEP_ALIVE

    def error_response(self, error: BridgeError, headers: Mapping[str, str]) -> Response:
        return error_response(error, headers)


def error_response(error: BridgeError, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """An HTTP error of the OpenAI-compatible API (``Retry-After`` and the like as on every face)."""
    merged = {**(headers or {}), **error.headers()}
    return JSONResponse(error.openai_body(), status_code=error.status, headers=merged)


ErrorRenderer = Callable[[BridgeError, Mapping[str, str] | None], Response]


def error_renderer(path: str) -> ErrorRenderer:
    """How an error raised before a handler could answer (routing, guards, the app's handlers) is
    rendered: in OpenAI's shape under ``/v1/``, where a client parses no other, else natively."""
    return error_response if path.startswith(PATH_PREFIX) else native_error_response


def completion_body(reply: rag_pb2.ChatResponse, model: str, request_id: str) -> dict[str, Any]:
    """The ``chat.completion`` of ``stream: false``: the unary answer, its sources in ``bali_zero``."""
    return {
        "id": f"chatcmpl-{new_stream_id()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply.answer, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason(reply.completion),
            }
        ],
        "usage": usage(reply.completion.token_count),
        EXTENSION_FIELD: {"sources": sources(reply.metadata), "model": reply.metadata.model, "request_id": request_id},
    }


def models_body(models: Sequence[str]) -> dict[str, Any]:
    """``GET /v1/models``: the ids ``model`` may take (OPENAI_MODELS)."""
    return {
        "object": "list",
        "data": [{"id": m, "object": "model", "created": 0, "owned_by": OWNED_BY} for m in models],
    }
