"""A small real SSE client for tests: httpx streaming + the bridge's WHATWG parser."""

from __future__ import annotations

import asyncio
import json
import re
import socket
from dataclasses import dataclass, field
from typing import Any

import httpx

from bridge.sse import Event, Parser

STREAM_PATH = "/api/v2/bali-zero/chat-stream"


@dataclass
class StreamReply:
    status: int
    headers: httpx.Headers
    events: list[Event] = field(default_factory=list)
    body: bytes = b""

    @property
    def frames(self) -> list[dict[str, Any]]:
        """Data frames (default ``message`` events) as JSON."""
        return [json.loads(e.data) for e in self.events if e.type == "message"]

    @property
    def heartbeats(self) -> list[Event]:
        return [e for e in self.events if e.type == "heartbeat"]

    def tokens(self) -> list[str]:
        return [f["text"] for f in self.frames if f["type"] == "token"]

    def json(self) -> Any:
        return json.loads(self.body)


async def open_stream(
    base_url: str,
    *,
    method: str = "GET",
    params: dict[str, str] | None = None,
    json_body: Any = None,
    headers: dict[str, str] | None = None,
    stop_after_tokens: int | None = None,
    timeout: float = 30,
    first_token: asyncio.Event | None = None,
) -> StreamReply:
    """Read a whole stream (or stop after N tokens, closing the connection); ``first_token`` is set
    when the first token frame arrived (for a test that acts while the stream is being read)."""
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout) as client:
        request = client.build_request(method, STREAM_PATH, params=params, json=json_body, headers=headers)
        response = await client.send(request, stream=True)
        try:
            reply = StreamReply(response.status_code, response.headers)
            if not response.headers.get("content-type", "").startswith("text/event-stream"):
                reply.body = await response.aread()
                return reply
            parser = Parser()
            tokens = 0
            async for chunk in response.aiter_raw():
                for event in parser.feed(chunk):
                    reply.events.append(event)
                    if event.type == "message" and json.loads(event.data)["type"] == "token":
                        tokens += 1
                        if first_token is not None:
                            first_token.set()
                        if stop_after_tokens is not None and tokens >= stop_after_tokens:
                            return reply
            return reply
        finally:
            await response.aclose()


_TOKEN_ID = re.compile(rb'id: ([A-Za-z0-9_-]+:[0-9]+)\ndata: \{"type":"token"')


async def lagging_reader(url: str, head: str) -> tuple[asyncio.StreamWriter, bytes, str]:
    """Send the request ``head`` (without its blank line) from a socket with a 4 KiB receive
    buffer and read until the first token frame: (writer, bytes read, that frame's event id).

    A reader that then stops reading lags far behind an answer the upstream finishes at once.
    """
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    writer.write(f"{head}\r\n".encode())
    seen = b""
    while (match := _TOKEN_ID.search(seen)) is None:
        chunk = await reader.read(4096)
        assert chunk, f"closed before a token: {seen[-300:]!r}"
        seen += chunk
    return writer, seen, match.group(1).decode()
