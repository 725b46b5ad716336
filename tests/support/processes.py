"""Real processes for tests: the stub RAG server and the bridge, each on a free loopback port.

Both print a "listening" line when ready, so tests wait for that line instead of sleeping.
The stub's stream-end JSON lines are collected so a test can await "request X ended as Y".
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from bzb_shared.childproc import ROOT as ROOT
from bzb_shared.childproc import Process as Process
from bzb_shared.childproc import base_env as base_env

_STUB_READY = re.compile(r"^rag-stub listening on (\S+):(\d+)$")
_BRIDGE_READY = re.compile(r"^bali-zero-bridge listening on (http://\S+)$")


T = TypeVar("T")


def with_port_retries(start: Callable[[], T], attempts: int = 3) -> T:
    """Start a server on a probed free port, again when another process took the port first.

    Servers that pick their own port (``--port 0``) never need this; those given a probed port
    (redis-server, nginx) raise RuntimeError when the bind loses the race.
    """
    for attempt in range(attempts):
        try:
            return start()
        except RuntimeError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Stub(Process):
    ready_pattern = _STUB_READY

    def __init__(self, *args: str, env: Mapping[str, str] | None = None, port: int = 0) -> None:
        argv = [sys.executable, "-m", "rag_stub", "--port", str(port), *args]
        super().__init__(argv, base_env(env), ROOT)
        self.port = int(self.ready.group(2))
        self.target = f"127.0.0.1:{self.port}"

    def stream_ends(self) -> list[dict[str, Any]]:
        with self._cond:
            return [json.loads(x) for x in self.lines if x.startswith('{"event":"stream_end"')]

    def wait_for_end(self, request_id: str | None = None, timeout: float = 10) -> dict[str, Any]:
        """The stream-end record of ``request_id`` (or of the next stream to end when None)."""
        seen = len(self.stream_ends()) if request_id is None else 0

        def match(line: str) -> bool:
            return line.startswith('{"event":"stream_end"') and (
                request_id is None or json.loads(line)["request_id"] == request_id
            )

        if request_id is None:
            deadline = time.monotonic() + timeout
            with self._cond:
                self._cond.wait_for(lambda: len(self.stream_ends()) > seen, max(0, deadline - time.monotonic()))
            ends = self.stream_ends()
            if len(ends) <= seen:
                raise TimeoutError(f"no stream ended within {timeout}s")
            return ends[seen]
        return dict(json.loads(self.wait_for_line(match, timeout)))

    async def ended(self, request_id: str | None = None, timeout: float = 10) -> dict[str, Any]:
        """``wait_for_end`` for async tests: waits on a thread so the event loop keeps running."""
        return await asyncio.to_thread(self.wait_for_end, request_id, timeout)


class Bridge(Process):
    ready_pattern = _BRIDGE_READY

    def __init__(self, env: Mapping[str, str], *args: str, cwd: Path | None = None) -> None:
        argv = [sys.executable, "-m", "bridge", "--port", "0", *args]
        super().__init__(argv, base_env(env), cwd or ROOT)
        self.url = self.ready.group(1)
        self.port = int(self.url.rsplit(":", 1)[1])
