"""The stub RAG server over real gRPC on loopback: order, echo fidelity, cancellation, deadlines,
failures, health, reflection and input validation."""

from __future__ import annotations

import time
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from bali_zero.rag.v1 import rag_pb2, rag_pb2_grpc
from tests.conftest import StubFactory
from tests.payloads import BIG_TOKEN, DELIM, EDGE_TOKENS, MANY_TOKENS, as_query
from tests.support.processes import Stub

SERVICE = "bali_zero.rag.v1.RagService"


def channel(stub: Stub) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(stub.target)


async def collect(stub: Stub, query: str, **kw: Any) -> list[rag_pb2.StreamChatResponse]:
    async with channel(stub) as ch:
        call = rag_pb2_grpc.RagServiceStub(ch).StreamChat(rag_pb2.StreamChatRequest(query=query, **kw))
        return [m async for m in call]


async def test_rag_mode_streams_metadata_tokens_in_order_then_completion(stub_factory: StubFactory) -> None:
    stub = stub_factory()
    messages = await collect(stub, "How do I extend a B211A visa?", request_id="order-1")
    kinds = [m.WhichOneof("event") for m in messages]
    assert kinds[0] == "metadata" and kinds[-1] == "completion"
    assert set(kinds[1:-1]) == {"token"}
    tokens = [m.token for m in messages[1:-1]]
    assert [t.index for t in tokens] == list(range(len(tokens)))
    assert messages[-1].completion.token_count == len(tokens)
    assert messages[-1].completion.finish_reason == rag_pb2.FINISH_REASON_STOP
    sources = messages[0].metadata.sources
    assert sources and "B211A" in sources[0].title
    assert messages[0].metadata.request_id == "order-1"
    assert (await stub.ended("order-1"))["outcome"] == "completed"


@pytest.mark.parametrize("name", sorted(EDGE_TOKENS))
async def test_echo_mode_keeps_every_character(stub_factory: StubFactory, name: str) -> None:
    stub = stub_factory("--mode", "echo", "--echo-delimiter", DELIM)
    tokens = EDGE_TOKENS[name]
    messages = await collect(stub, as_query(tokens))
    assert [m.token.text for m in messages if m.HasField("token")] == tokens


async def test_echo_mode_word_split_round_trips(echo_stub: Stub) -> None:
    query = "  hello\r\nworld \r 👩‍👩‍👧 é\u2028x\tend  "
    messages = await collect(echo_stub, query)
    assert "".join(m.token.text for m in messages if m.HasField("token")) == query


async def test_big_and_many_tokens(stub_factory: StubFactory) -> None:
    stub = stub_factory("--mode", "echo", "--echo-delimiter", DELIM, "--max-query-bytes", "70000")
    big = await collect(stub, as_query(BIG_TOKEN))
    assert [m.token.text for m in big if m.HasField("token")] == BIG_TOKEN
    many = await collect(stub, as_query(MANY_TOKENS))
    assert [m.token.text for m in many if m.HasField("token")] == MANY_TOKENS


async def test_cancel_after_three_tokens_is_seen_within_50ms(stub_factory: StubFactory) -> None:
    stub = stub_factory("--mode", "echo", "--token-delay-ms", "20", "--repeat", "50")
    async with channel(stub) as ch:
        call = rag_pb2_grpc.RagServiceStub(ch).StreamChat(
            rag_pb2.StreamChatRequest(query="one two three four five", request_id="cancel-3")
        )
        seen = 0
        async for message in call:
            seen += message.HasField("token")
            if seen == 3:
                cancelled_at = time.time()
                call.cancel()
                break
    end = await stub.ended("cancel-3")
    assert end["outcome"] == "cancelled"
    assert end["tokens_sent"] <= 4, "the server must stop producing once cancelled"
    assert end["ended_at"] - cancelled_at < 0.050


async def test_deadline_exceeded_ends_stream_and_is_logged(stub_factory: StubFactory) -> None:
    stub = stub_factory("--mode", "echo", "--token-delay-ms", "20", "--repeat", "100")
    async with channel(stub) as ch:
        call = rag_pb2_grpc.RagServiceStub(ch).StreamChat(
            rag_pb2.StreamChatRequest(query="slow answer", request_id="deadline-1"), timeout=0.3
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call:
                pass
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert (await stub.ended("deadline-1"))["outcome"] == "deadline_exceeded"


async def test_fail_after_gives_unavailable(stub_factory: StubFactory) -> None:
    stub = stub_factory("--mode", "echo", "--fail-after", "2")
    async with channel(stub) as ch:
        call = rag_pb2_grpc.RagServiceStub(ch).StreamChat(
            rag_pb2.StreamChatRequest(query="a b c d e", request_id="fail-1")
        )
        tokens = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for m in call:
                if m.HasField("token"):
                    tokens.append(m.token.text)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert tokens == ["a ", "b "]
    end = await stub.ended("fail-1")
    assert end["outcome"] == "failed" and end["tokens_sent"] == 2


async def test_health_reports_serving(echo_stub: Stub) -> None:
    async with channel(echo_stub) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", SERVICE):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_the_service(echo_stub: Stub) -> None:
    async with channel(echo_stub) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = [s.name async for r in call for s in r.list_services_response.service]
    assert SERVICE in names and "grpc.health.v1.Health" in names


@pytest.mark.parametrize(
    ("request_kwargs", "field"),
    [
        ({"query": ""}, "query"),
        ({"query": "   "}, "query"),
        ({"query": "x" * 8193}, "query"),
        ({"query": "ok", "conversation_history": [rag_pb2.ChatMessage(content="hi")]}, "conversation_history[0].role"),
        (
            {"query": "ok", "conversation_history": [rag_pb2.ChatMessage(role=rag_pb2.CHAT_ROLE_USER)]},
            "conversation_history[0].content",
        ),
    ],
)
async def test_bad_requests_get_invalid_argument_with_details(
    echo_stub: Stub, request_kwargs: dict[str, Any], field: str
) -> None:
    async with channel(echo_stub) as ch:
        rag = rag_pb2_grpc.RagServiceStub(ch)
        for invoke in (
            lambda: rag.StreamChat(rag_pb2.StreamChatRequest(**request_kwargs)).read(),
            lambda: rag.Chat(rag_pb2.ChatRequest(**request_kwargs)),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await invoke()
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert field.split("[")[0] in (info.value.details() or "")
            status = rpc_status.from_call(info.value)
            assert status is not None
            detail = error_details_pb2.BadRequest()
            assert status.details[0].Unpack(detail)
            assert detail.field_violations[0].field == field


async def test_unary_chat_returns_whole_answer(echo_stub: Stub) -> None:
    async with channel(echo_stub) as ch:
        reply = await rag_pb2_grpc.RagServiceStub(ch).Chat(rag_pb2.ChatRequest(query="hello there"))
    assert reply.answer == "hello there"
    assert reply.completion.token_count == 2


def test_stub_prints_listening_line_and_exits_cleanly_on_sigterm(stub_factory: StubFactory) -> None:
    stub = stub_factory()
    assert stub.lines[0] == f"rag-stub listening on 127.0.0.1:{stub.port}"
    stub.stop()
    assert stub.proc.returncode == 0
