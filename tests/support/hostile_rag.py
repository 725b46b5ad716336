"""A RAG server that breaks the contract on request: the query names the misbehaviour.

The stub (rag_stub/) keeps the contract; this process is for the attacks where the upstream does
not: scores that are not JSON numbers, token indexes that are not 0, 1, 2…, a metadata message
after the tokens, messages after the completion, and so on. ``SCENARIOS`` lists them; an unknown
query gets a well-behaved two-token answer. Both RPCs answer from the same script (``Chat`` folds
it into one message).

Run as ``python -m tests.support.hostile_rag [--port 0]``; it prints the stub's
``rag-stub listening on HOST:PORT`` line when ready, so :class:`HostileRag` waits for that.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from collections.abc import Iterator
from typing import Any

from tests.support.processes import _STUB_READY, ROOT, Process, base_env
from tests.support.rag_server import serve_until_signalled

NON_FINITE_SCORES = "non-finite-scores"
UNSET_TOKEN_INDEX = "unset-token-index"
EMPTY_SOURCES_FLOOD = "empty-sources-flood"
SCENARIOS = (NON_FINITE_SCORES, UNSET_TOKEN_INDEX, EMPTY_SOURCES_FLOOD)
# An empty Source costs 2 bytes in protobuf (tag, length 0): this many fit one 4 MiB message.
FLOOD_SOURCES = 1_500_000


def script(query: str) -> Iterator[Any]:
    """The messages answering ``query`` (StreamChatResponse events, in order)."""
    from bali_zero.rag.v1 import rag_pb2

    def token(index: int, text: str) -> rag_pb2.StreamChatResponse:
        return rag_pb2.StreamChatResponse(token=rag_pb2.Token(index=index, text=text))

    scores = [0.5, 0.25]
    if query == NON_FINITE_SCORES:
        scores = [math.nan, math.inf, -math.inf, 1.5]
    sources = [rag_pb2.Source(title=f"doc {i}", uri=f"https://docs.example/{i}", score=s) for i, s in enumerate(scores)]
    if query == EMPTY_SOURCES_FLOOD:
        sources = [rag_pb2.Source()] * FLOOD_SOURCES
    yield rag_pb2.StreamChatResponse(metadata=rag_pb2.Metadata(sources=sources, model="hostile", request_id="r"))
    pieces = ["one ", "two ", "three"]
    for index, text in enumerate(pieces):
        # proto3 cannot tell an index set to 0 from one never set: a server that forgets the
        # field sends 0 for every token.
        yield token(0 if query == UNSET_TOKEN_INDEX else index, text)
    yield rag_pb2.StreamChatResponse(
        completion=rag_pb2.Completion(finish_reason=rag_pb2.FINISH_REASON_STOP, token_count=len(pieces))
    )


async def _serve(port: int) -> None:
    from bali_zero.rag.v1 import rag_pb2, rag_pb2_grpc

    class Hostile(rag_pb2_grpc.RagServiceServicer):
        async def StreamChat(self, request: rag_pb2.StreamChatRequest, context: Any) -> None:
            for message in script(request.query):
                await context.write(message)

        async def Chat(self, request: rag_pb2.ChatRequest, context: Any) -> rag_pb2.ChatResponse:
            reply = rag_pb2.ChatResponse()
            for message in script(request.query):
                kind = message.WhichOneof("event")
                if kind == "metadata":
                    reply.metadata.CopyFrom(message.metadata)
                elif kind == "token":
                    reply.answer += message.token.text
                else:
                    reply.completion.CopyFrom(message.completion)
            return reply

    await serve_until_signalled(Hostile(), "127.0.0.1", port)


class HostileRag(Process):
    """The hostile RAG server on a free loopback port (``target`` for RAG_TARGET)."""

    ready_pattern = _STUB_READY

    def __init__(self) -> None:
        super().__init__([sys.executable, "-m", "tests.support.hostile_rag", "--port", "0"], base_env(None), ROOT)
        self.target = f"127.0.0.1:{int(self.ready.group(2))}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    asyncio.run(_serve(parser.parse_args().port))
