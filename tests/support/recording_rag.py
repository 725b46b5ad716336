"""The real stub RAG server, also printing the identity fields of every request it receives.

The bridge forwards ``user_role`` and ``user_email`` to the RAG service, and nothing on the HTTP
side shows them; this process makes them observable. It is the unchanged ``RagStub`` (same
answers, same stream-end lines) with one JSON line per call before the stub handles it::

    {"event": "request", "rpc": "Chat|StreamChat", "request_id": ..., "user_role": ..., "user_email": ...}

Run as ``python -m tests.support.recording_rag [--port 0] [stub options]``; it prints the stub's
own ``rag-stub listening on HOST:PORT`` line when ready, so :class:`RecordingStub` waits for that.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Mapping
from typing import Any

from tests.support.processes import _STUB_READY, ROOT, Process, base_env
from tests.support.rag_server import serve_until_signalled


def _record(rpc: str, request: Any) -> None:
    line = {
        "event": "request",
        "rpc": rpc,
        "request_id": request.request_id,
        "user_role": request.user_role,
        "user_email": request.user_email,
    }
    sys.stdout.write(json.dumps(line, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def _serve(argv: list[str]) -> None:
    from bali_zero.rag.v1 import rag_pb2
    from rag_stub.cli import parse_args
    from rag_stub.server import RagStub

    class Recording(RagStub):
        async def StreamChat(self, request: rag_pb2.StreamChatRequest, context: Any) -> None:
            _record("StreamChat", request)
            await super().StreamChat(request, context)

        async def Chat(self, request: rag_pb2.ChatRequest, context: Any) -> rag_pb2.ChatResponse:
            _record("Chat", request)
            return await super().Chat(request, context)

    args, config = parse_args(argv)
    await serve_until_signalled(Recording(config), args.host, args.port)


class RecordingStub(Process):
    """A recording stub process on a free loopback port; ``requests()`` are the recorded calls."""

    ready_pattern = _STUB_READY

    def __init__(self, *args: str, env: Mapping[str, str] | None = None) -> None:
        super().__init__(
            [sys.executable, "-m", "tests.support.recording_rag", "--port", "0", *args], base_env(env), ROOT
        )
        self.target = f"127.0.0.1:{int(self.ready.group(2))}"

    def requests(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in list(self.lines) if x.startswith('{"event":"request"')]

    def wait_for_request(self, request_id: str, timeout: float = 10) -> dict[str, Any]:
        """The recorded call carrying ``request_id`` (the bridge forwards ``x-request-id``)."""
        deadline = time.monotonic() + timeout
        line = self.wait_for_line(
            lambda x: x.startswith('{"event":"request"') and json.loads(x)["request_id"] == request_id,
            max(0.0, deadline - time.monotonic()),
        )
        return dict(json.loads(line))


if __name__ == "__main__":
    asyncio.run(_serve(sys.argv[1:]))
