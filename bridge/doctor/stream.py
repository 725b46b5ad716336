"""The diagnostic stream ``bali-zero-bridge doctor`` reads: what the path to the bridge does to SSE.

``GET /api/v2/bali-zero/chat-stream/diagnostic?idle_s=N`` answers with the stream endpoint's own
headers (so every proxy treats it like a real stream), then:

* ``FRAMES`` frames ``FRAME_INTERVAL_S`` apart, each carrying its send time: a buffering or
  compressing proxy delivers them together, a good path delivers them apart;
* the first frame says whether a ``Last-Event-ID`` header arrived (its value, if it is a plain
  id), so a proxy that drops the header, breaking resume, shows;
* ``idle_s`` of silence (no heartbeat), then a ``done`` frame: a proxy whose read timeout is
  shorter than the heartbeat interval cuts the connection before ``done`` arrives.

It never calls the RAG service. Callers pass the same gate as a chat request (auth, rate limit)
and hold one of their stream slots while it runs, and ``idle_s`` is capped a little above the
heartbeat interval, so it cannot be used to pin connections or amplify load.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Callable
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from bridge import sse
from bridge.errors import BadRequest

FRAMES = 10
FRAME_INTERVAL_S = 0.1
# Longest idle a caller may ask for, beyond the heartbeat interval: enough to see a read timeout
# equal to the interval, little enough that the endpoint cannot pin connections.
IDLE_MARGIN_S = 5.0
_PLAIN_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def max_idle_s(heartbeat_interval_s: float) -> float:
    return heartbeat_interval_s + IDLE_MARGIN_S


def parse_idle(raw: str | None, heartbeat_interval_s: float) -> float:
    """``idle_s`` from the query: a number in 0..heartbeat + margin, else BadRequest."""
    if raw is None or raw == "":
        return 0.0
    limit = max_idle_s(heartbeat_interval_s)
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest("idle_s must be a number of seconds", code="INVALID_REQUEST") from None
    if not 0 <= value <= limit:  # also rejects nan and inf
        raise BadRequest(
            f"idle_s must be within 0..{limit:g} (HEARTBEAT_INTERVAL_S + {IDLE_MARGIN_S:g})", code="INVALID_REQUEST"
        )
    return value


def echoed_event_id(header: str | None) -> str | None:
    """The Last-Event-ID the bridge received, echoed only when it is a plain id (no injection)."""
    if header is None:
        return None
    return header if _PLAIN_ID.fullmatch(header) else "(not a plain id)"


class DiagnosticStream(Response):
    """The response; ``on_end`` runs exactly once however the stream ends (it frees the slot)."""

    media_type = sse.MEDIA_TYPE

    def __init__(
        self,
        *,
        idle_s: float,
        last_event_id: str | None,
        heartbeat_interval_s: float,
        send_timeout_s: float,
        headers: dict[str, str],
        on_end: Callable[[], None],
    ) -> None:
        self.status_code = 200
        self.background = None
        self.idle_s = idle_s
        self.last_event_id = last_event_id
        self.heartbeat_interval_s = heartbeat_interval_s
        self.send_timeout_s = send_timeout_s
        self.raw_headers = sse.response_headers(heartbeat_interval_s, headers)
        self.on_end = on_end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            writer = asyncio.ensure_future(self._write(send))
            watcher = asyncio.ensure_future(_disconnected(receive))
            try:
                await asyncio.wait({writer, watcher}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (writer, watcher):
                    task.cancel()
                await asyncio.gather(writer, watcher, return_exceptions=True)
        finally:
            self.on_end()

    async def _write(self, send: Send) -> None:
        for seq in range(FRAMES):
            payload: dict[str, Any] = {"type": "diagnostic", "seq": seq, "sent_at": time.time()}
            if seq == 0:
                payload.update(
                    frames=FRAMES,
                    interval_ms=round(FRAME_INTERVAL_S * 1000),
                    idle_s=self.idle_s,
                    last_event_id=echoed_event_id(self.last_event_id),
                )
            await self._send(send, sse.frame(f"diagnostic:{seq}", json.dumps(payload, separators=(",", ":"))))
            if seq < FRAMES - 1:
                await asyncio.sleep(FRAME_INTERVAL_S)
        await asyncio.sleep(self.idle_s)
        done = {"type": "done", "finish_reason": "stop", "metrics": None}
        await self._send(send, sse.frame(f"diagnostic:{FRAMES}", json.dumps(done, separators=(",", ":"))))
        with contextlib.suppress(Exception):
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _send(self, send: Send, body: bytes) -> None:
        async with asyncio.timeout(self.send_timeout_s):  # a reader that stopped reading ends it
            await send({"type": "http.response.body", "body": body, "more_body": True})


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
