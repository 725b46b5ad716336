"""The bridge's keepalive pings against a RAG server with gRPC's default ping policy, and what gRPC's
C core writes on the bridge's stderr meanwhile.

A default gRPC server counts a strike for each ping sooner than 5 minutes after the previous one
(while it sent no data) and answers the third with GOAWAY ENHANCE_YOUR_CALM "too_many_pings",
closing the connection. The bridge always has a call open upstream (the health-check Watch), so it
pings whenever its keepalive time elapses. Times here are the real ones scaled down by ``SCALE``
(gRPC sends at most one ping a second, hence the floor); a GOAWAY shows as a new upstream
connection (another local port) and, with C-core logging chosen explicitly, as its log line.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest

from bridge.config import ConfigError, Settings
from bridge.upstream import channel_options, keepalive_options
from rag_stub.server import StubConfig, keepalive_policy
from tests.conftest import BridgeFactory, StubFactory
from tests.support.processes import Bridge
from tests.support.sse_client import open_stream

SCALE = 150
GRPC_DEFAULT_MIN_PING_INTERVAL_S = 300.0  # grpc.http2.min_ping_interval_without_data_ms
SERVER_MIN_PING_S = GRPC_DEFAULT_MIN_PING_INTERVAL_S / SCALE
BRIDGE_KEEPALIVE_S = max(1.0, Settings().upstream_keepalive_s / SCALE)
HOLD_PERIODS = 3  # pings held idle, then busy: a third strike would be a GOAWAY
GOAWAY_LINE = "too_many_pings"
C_CORE_LOGS = {"GRPC_VERBOSITY": "ERROR", "GRPC_TRACE": ""}  # an operator's explicit choice
NO_C_CORE_CHOICE = {"GRPC_VERBOSITY": "", "GRPC_TRACE": ""}  # as if unset (the test's own env aside)


# ---------------------------------------------------------------------------- the settings, in process


def test_default_keepalive_is_no_more_often_than_a_default_grpc_server_allows() -> None:
    assert Settings().upstream_keepalive_s >= GRPC_DEFAULT_MIN_PING_INTERVAL_S
    assert dict(keepalive_policy(StubConfig().min_ping_interval_s)) == {
        "grpc.http2.min_ping_interval_without_data_ms": 300_000,
        "grpc.http2.max_ping_strikes": 2,
        "grpc.keepalive_permit_without_calls": 0,
    }


def test_channel_pings_at_the_keepalive_setting_and_never_without_a_call() -> None:
    options = dict(channel_options("127.0.0.1:50051", keepalive_s=400))
    assert options["grpc.keepalive_time_ms"] == 400_000
    assert options["grpc.keepalive_permit_without_calls"] == 0
    assert dict(keepalive_options(1.5))["grpc.keepalive_time_ms"] == 1500


@pytest.mark.parametrize("value", ["0.5", "0", "-1", "nan", "soon"])
def test_upstream_keepalive_below_a_second_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="UPSTREAM_KEEPALIVE_S"):
        Settings.from_env({"UPSTREAM_KEEPALIVE_S": value})


# ---------------------------------------------------------------------------- real processes


def upstream_connections(server_port: int) -> frozenset[int]:
    """Local ports of the established TCP connections to ``server_port`` on loopback (the bridge's:
    nothing else here talks to the stub). A new port is a new connection: the old one was dropped."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):  # gRPC's sockets are dual-stack (tcp6)
        for line in Path(table).read_text().splitlines()[1:]:
            local, remote, state = line.split()[1:4]
            if state == "01" and int(remote.rsplit(":", 1)[1], 16) == server_port:
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return frozenset(ports)


async def connected_upstream(bridge: Bridge, server_port: int) -> frozenset[int]:
    """The bridge's upstream connection once /readyz says the RAG service answers its health check."""
    async with httpx.AsyncClient(base_url=bridge.url, timeout=10) as client:
        deadline = time.monotonic() + 20
        while (await client.get("/readyz")).status_code != 200:
            assert time.monotonic() < deadline, "the bridge never saw the stub serving"
            await asyncio.sleep(0.1)
    connections = upstream_connections(server_port)
    assert len(connections) == 1, connections
    return connections


async def goaway_logged(bridge: Bridge, within: float) -> bool:
    """True when the C core logs a too_many_pings GOAWAY within ``within`` seconds."""
    try:
        await asyncio.to_thread(bridge.wait_for_line, lambda line: GOAWAY_LINE in line, within, stderr=True)
    except TimeoutError:
        return False
    return True


async def test_keepalive_faster_than_the_servers_minimum_draws_goaway_too_many_pings(
    stub_factory: StubFactory, bridge_factory: BridgeFactory
) -> None:
    """The failure mode, a client pinging far more often than a default server allows: the server
    drops the idle connection after three pings, and the detectors used here see it."""
    stub = stub_factory("--mode", "echo", "--min-ping-interval-s", str(SERVER_MIN_PING_S))
    bridge = bridge_factory(stub, UPSTREAM_KEEPALIVE_S="1", **C_CORE_LOGS)
    first = await connected_upstream(bridge, stub.port)
    assert await goaway_logged(bridge, 6 * SERVER_MIN_PING_S), bridge.output()
    deadline = time.monotonic() + 10
    while upstream_connections(stub.port) in (first, frozenset()):
        assert time.monotonic() < deadline, "no new upstream connection after the GOAWAY"
        await asyncio.sleep(0.1)


async def test_default_keepalive_against_a_default_policy_server_keeps_the_connection_idle_and_busy(
    stub_factory: StubFactory, bridge_factory: BridgeFactory
) -> None:
    """Idle (only the health Watch open), then one stream silent for as long before its first token:
    no GOAWAY, the same upstream connection throughout, the stream answered whole on one call."""
    silent_s = HOLD_PERIODS * BRIDGE_KEEPALIVE_S
    stub = stub_factory(
        "--mode",
        "echo",
        "--min-ping-interval-s",
        str(SERVER_MIN_PING_S),
        "--first-token-delay-ms",
        str(silent_s * 1000),
    )
    bridge = bridge_factory(stub, UPSTREAM_KEEPALIVE_S=str(BRIDGE_KEEPALIVE_S), **C_CORE_LOGS)
    connection = await connected_upstream(bridge, stub.port)

    assert not await goaway_logged(bridge, HOLD_PERIODS * BRIDGE_KEEPALIVE_S + 1), bridge.output()
    assert upstream_connections(stub.port) == connection

    reply = await open_stream(bridge.url, params={"query": "answered after a long silence"}, timeout=silent_s + 30)
    assert reply.status == 200
    assert reply.frames[-1]["type"] == "done", reply.frames[-1]
    assert "".join(reply.tokens()) == "answered after a long silence"
    assert not await goaway_logged(bridge, 0.1), bridge.output()
    assert upstream_connections(stub.port) == connection
    assert [end["outcome"] for end in stub.stream_ends()] == ["completed"]  # one call, no retry


async def test_bridge_stderr_stays_one_json_object_per_line_while_grpc_core_logs_a_goaway(
    stub_factory: StubFactory, bridge_factory: BridgeFactory
) -> None:
    """With no C-core log choice made, the bridge silences the C core: otherwise its plain-text lines
    ("E1206 ... chttp2_transport.cc ...] ... too_many_pings") land among the JSON lines."""
    stub = stub_factory("--mode", "echo", "--min-ping-interval-s", str(SERVER_MIN_PING_S))
    bridge = bridge_factory(stub, UPSTREAM_KEEPALIVE_S="1", LOG_LEVEL="INFO", **NO_C_CORE_CHOICE)
    first = await connected_upstream(bridge, stub.port)
    deadline = time.monotonic() + 6 * SERVER_MIN_PING_S + 10
    while upstream_connections(stub.port) in (first, frozenset()):  # the GOAWAY happened
        assert time.monotonic() < deadline, "no GOAWAY: nothing for the C core to log"
        await asyncio.sleep(0.1)
    async with httpx.AsyncClient(base_url=bridge.url, timeout=10) as client:
        assert (await client.get("/healthz")).status_code == 200
    bridge.stop()

    assert bridge.stderr_lines, "the bridge logged nothing at INFO"
    assert [line for line in bridge.stderr_lines if not is_json_object(line)] == []


def is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False
