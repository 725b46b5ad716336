"""Ctrl-C is a stop, not an error: exit 0, no traceback, no ERROR line, streams ended with a frame.

uvicorn re-raised the captured SIGINT after its shutdown; the KeyboardInterrupt inside the loop
cancelled the handlers still running (an ERROR "Exception in ASGI application" with a
CancelledError traceback each) and the process died by the signal. A second Ctrl-C (or `make run`'s
Ctrl-C, which reaches the bridge as SIGINT plus SIGTERM from the script) force-exited uvicorn,
skipping the lifespan shutdown that flushes the audit queue.
"""

from __future__ import annotations

import json
import signal
import threading
from typing import Any

import httpx
import pytest

from bridge.sse import Parser
from tests.conftest import BridgeFactory, StubFactory
from tests.support.processes import Bridge
from tests.support.redis import redis_factory, redis_server  # noqa: F401  (fixtures)
from tests.support.sse_client import STREAM_PATH
from tests.support.workers import two_workers


class _Reader(threading.Thread):
    """Reads one stream on a thread; ``first_token`` is set when a token frame arrived."""

    def __init__(self, bridge: Bridge) -> None:
        super().__init__(daemon=True)
        self.url = bridge.url + STREAM_PATH
        self.first_token = threading.Event()
        self.frames: list[dict[str, Any]] = []

    def run(self) -> None:
        parser = Parser()
        with httpx.stream("GET", self.url, params={"query": "a b c d"}, timeout=60) as response:
            for chunk in response.iter_raw():
                for event in parser.feed(chunk):
                    if event.type == "message":
                        frame = json.loads(event.data)
                        self.frames.append(frame)
                        if frame["type"] == "token":
                            self.first_token.set()


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-workers"])
@pytest.mark.parametrize(
    ("signals", "grace"),
    [
        ((signal.SIGINT,), "1"),  # one Ctrl-C: the grace runs out, the stream gets SHUTTING_DOWN
        ((signal.SIGINT, signal.SIGINT), "30"),  # Ctrl-C twice: end the streams now
        ((signal.SIGINT, signal.SIGTERM), "30"),  # Ctrl-C under `make run`: the script adds SIGTERM
    ],
    ids=["sigint", "sigint-twice", "sigint-then-sigterm"],
)
def test_ctrl_c_with_an_open_stream_exits_0_without_traceback(
    stub_factory: StubFactory,
    bridge_factory: BridgeFactory,
    request: pytest.FixtureRequest,
    signals: tuple[int, ...],
    grace: str,
    workers: int,
) -> None:
    """With two workers the signal reaches the supervisor, which forwards it to both: each drains,
    and the supervisor exits 0 once both did."""
    stub = stub_factory("--mode", "echo", "--token-delay-ms", "100", "--repeat", "200")
    env = {"SHUTDOWN_GRACE_S": grace, "LOG_LEVEL": "INFO"}
    if workers > 1:
        env = two_workers(request.getfixturevalue("redis_server"), **env)
    for attempt in range(2):  # it used to happen "sometimes": repeat
        bridge = bridge_factory(stub, **env)
        reader = _Reader(bridge)
        reader.start()
        assert reader.first_token.wait(15), bridge.output()
        first, *more = signals
        bridge.signal(first)
        if more:
            # Two signals sent back to back can merge into one delivery: send the second once the
            # first was handled (uvicorn logs "Shutting down" after its handler ran; in each worker).
            bridge.wait_for_line(
                lambda line, lines=bridge.stderr_lines: sum("Shutting down" in seen for seen in lines) >= workers,
                stderr=True,
            )
            bridge.signal(more[0])
        assert bridge.wait(30) == 0, (attempt, bridge.output())
        reader.join(10)
        bridge.stop()  # joins the pipe readers' last lines
        stderr = "\n".join(bridge.stderr_lines)
        assert "Traceback" not in stderr and "CancelledError" not in stderr, (attempt, stderr[-3000:])
        assert not [line for line in bridge.stderr_lines if '"level":"ERROR"' in line], (attempt, stderr[-3000:])
        assert "Application shutdown complete" in stderr  # the lifespan ran: the audit queue was flushed
        assert reader.frames[-1]["type"] == "error" and reader.frames[-1]["code"] == "SHUTTING_DOWN"
