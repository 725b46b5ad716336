"""Each worker's private socket, through which any worker gathers the whole server's stats.

Every worker listens on ``<supervisor dir>/peers/<slot>.sock``: a Unix socket in a directory only
the bridge's user can enter (0700), never a TCP port. A request is one line naming what is asked
(``stats``); the answer is one JSON document and the connection closes. The stats endpoint asks
every other worker at once, each bounded in time and bytes, and merges the answers with its own
(bridge/stats.py ``merge_snapshots``): percentiles over the union of every worker's samples, not
an average of percentiles. A worker that does not answer in time (being replaced) is left out and
the answer says how many workers reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("bridge.workers")

ASK_TIMEOUT_S = 1.0
MAX_REQUEST_BYTES = 64
MAX_ANSWER_BYTES = 16 * 1024 * 1024
"""A full stats window is ~2 x 60 x 512 samples, about 1.5 MB of JSON: far below this bound."""

Answer = Callable[[], dict[str, Any]]


def socket_path(peers_dir: Path, slot: int) -> Path:
    return peers_dir / f"{slot}.sock"


class PeerServer:
    """This worker's side: answers ``stats`` with ``answer()``, on the event loop."""

    def __init__(self, peers_dir: Path, slot: int, answer: Answer) -> None:
        self.path = socket_path(peers_dir, slot)
        self._answer = answer
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        # A predecessor in this slot (a worker that died) left its socket file: take the name over.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(ASK_TIMEOUT_S):
                line = await reader.readuntil(b"\n")
            if line.strip() == b"stats" and len(line) <= MAX_REQUEST_BYTES:
                writer.write(json.dumps(self._answer(), separators=(",", ":")).encode())
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


async def ask(path: Path) -> dict[str, Any] | None:
    """One peer's ``stats`` answer, or None when it does not answer in time or answers garbage."""
    try:
        async with asyncio.timeout(ASK_TIMEOUT_S):
            reader, writer = await asyncio.open_unix_connection(str(path), limit=MAX_REQUEST_BYTES)
            try:
                writer.write(b"stats\n")
                await writer.drain()
                data = await reader.read(MAX_ANSWER_BYTES + 1)
                while len(data) <= MAX_ANSWER_BYTES and (more := await reader.read(MAX_ANSWER_BYTES + 1 - len(data))):
                    data += more
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return None
    if len(data) > MAX_ANSWER_BYTES:
        return None
    try:
        answer = json.loads(data)
    except ValueError:
        return None
    return answer if isinstance(answer, dict) else None


async def gather(peers_dir: Path, slot: int, count: int, own: dict[str, Any]) -> list[dict[str, Any]]:
    """``own`` plus the answers of every other worker that answered, asked all at once."""
    others = [socket_path(peers_dir, other) for other in range(count) if other != slot]
    answers = await asyncio.gather(*(ask(path) for path in others))
    return [own, *(answer for answer in answers if answer is not None and _well_formed(answer))]


_FIELDS = {
    "open_streams": int,
    "streams_opened": int,
    "reconnections": int,
    "sessions_held": int,
    "open_connections_by_cap": int,
    "outcomes": dict,
    "error_codes": dict,
    "first_token": list,
    "inter_token": list,
}


def _well_formed(answer: dict[str, Any]) -> bool:
    """Whether a peer's answer has the fields ``StreamStats.export`` gives, of the right types."""
    if not all(isinstance(answer.get(name), kind) for name, kind in _FIELDS.items()):
        return False
    for name in ("first_token", "inter_token"):
        for bucket in answer[name]:
            if not (
                isinstance(bucket, list)
                and len(bucket) == 3
                and isinstance(bucket[1], int)
                and isinstance(bucket[2], list)
                and all(isinstance(v, int | float) for v in bucket[2])
            ):
                return False
    counts = (*answer["outcomes"].values(), *answer["error_codes"].values())
    return all(isinstance(v, int) for v in counts)
