"""Resume after a dropped connection: Last-Event-ID continues exactly where the client stopped."""

from __future__ import annotations

import asyncio
import json

import httpx

from bridge.sse import Parser
from tests.conftest import BridgeFactory, StubFactory
from tests.support.sse_client import STREAM_PATH, open_stream


async def test_resume_continues_exactly_after_last_event_id(
    stub_factory: StubFactory, bridge_factory: BridgeFactory
) -> None:
    stub = stub_factory("--mode", "echo", "--echo-delimiter", ",", "--token-delay-ms", "5")
    bridge = bridge_factory(stub, RESUME_GRACE_S="5")
    query = ",".join(f"t{i}" for i in range(200))
    first = await open_stream(bridge.url, params={"query": query}, stop_after_tokens=10)
    assert first.tokens() == [f"t{i}" for i in range(10)]
    last_id = first.events[-1].last_event_id
    stream_id = first.frames[0]["stream_id"]
    await asyncio.sleep(1)  # the scenario under test: the client is away for a second
    second = await open_stream(bridge.url, params={"query": query}, headers={"Last-Event-ID": last_id})
    assert second.status == 200
    assert second.tokens() == [f"t{i}" for i in range(10, 200)], "no duplicates, no gaps"
    assert second.frames[-1]["type"] == "done"
    assert second.frames[-1]["metrics"]["tokens"] == 200
    assert all(e.last_event_id.startswith(stream_id + ":") for e in second.events)
    assert (await stub.ended(first.frames[0]["request_id"]))["outcome"] == "completed"


async def test_resume_by_connection_id_and_numeric_last_event_id(
    stub_factory: StubFactory, bridge_factory: BridgeFactory
) -> None:
    stub = stub_factory("--mode", "echo", "--echo-delimiter", ",", "--token-delay-ms", "5")
    bridge = bridge_factory(stub, RESUME_GRACE_S="5")
    query = ",".join(f"w{i}" for i in range(50))
    first = await open_stream(bridge.url, params={"query": query}, stop_after_tokens=5)
    stream_id, seq = first.events[-1].last_event_id.rsplit(":", 1)
    second = await open_stream(
        bridge.url, params={"query": query}, headers={"x-connection-id": stream_id, "Last-Event-ID": seq}
    )
    assert second.tokens() == [f"w{i}" for i in range(5, 50)]


async def test_grace_expired_gives_stream_expired_and_cancels_upstream(
    stub_factory: StubFactory, bridge_factory: BridgeFactory
) -> None:
    stub = stub_factory("--mode", "echo", "--echo-delimiter", ",", "--token-delay-ms", "20")
    bridge = bridge_factory(stub, RESUME_GRACE_S="0.5")
    query = ",".join(f"x{i}" for i in range(500))
    first = await open_stream(bridge.url, params={"query": query}, stop_after_tokens=3)
    end = await stub.ended(first.frames[0]["request_id"])
    assert end["outcome"] == "cancelled", "upstream is cancelled once the grace window passes"
    late = await open_stream(bridge.url, params={"query": query},
                             headers={"Last-Event-ID": first.events[-1].last_event_id})
    assert late.status == 200
    assert "content-length" not in late.headers  # an event stream, like every other
    assert late.frames == [{"type": "error", "code": "STREAM_EXPIRED", "message": late.frames[0]["message"],
                            "retryable": False}]


async def test_other_user_cannot_resume(stub_factory: StubFactory, bridge_factory: BridgeFactory) -> None:
    stub = stub_factory("--mode", "echo", "--echo-delimiter", ",", "--token-delay-ms", "20")
    bridge = bridge_factory(stub, RESUME_GRACE_S="5", TRUSTED_PROXIES="127.0.0.1/32")
    query = ",".join(f"y{i}" for i in range(100))
    first = await open_stream(bridge.url, params={"query": query}, headers={"x-user-id": "alice"},
                              stop_after_tokens=3)
    last_id = first.events[-1].last_event_id
    async with httpx.AsyncClient(base_url=bridge.url) as client:
        r = await client.get(STREAM_PATH, params={"query": query},
                             headers={"x-user-id": "mallory", "Last-Event-ID": last_id})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "STREAM_NOT_FOUND"
    mine = await open_stream(bridge.url, params={"query": query},
                             headers={"x-user-id": "alice", "Last-Event-ID": last_id})
    assert mine.tokens() == [f"y{i}" for i in range(3, 100)]


async def test_explicit_stop_cancels_at_once(stub_factory: StubFactory, bridge_factory: BridgeFactory) -> None:
    stub = stub_factory("--mode", "echo", "--echo-delimiter", ",", "--token-delay-ms", "20")
    bridge = bridge_factory(stub, RESUME_GRACE_S="30")
    query = ",".join(f"z{i}" for i in range(500))
    first = await open_stream(bridge.url, params={"query": query}, stop_after_tokens=2)
    stream_id = first.frames[0]["stream_id"]
    async with httpx.AsyncClient(base_url=bridge.url) as client:
        r = await client.delete(f"{STREAM_PATH}/{stream_id}")
        assert r.status_code == 204
        assert (await stub.ended(first.frames[0]["request_id"]))["outcome"] == "cancelled"
        again = await client.delete(f"{STREAM_PATH}/{stream_id}")
        assert again.status_code in (204, 404)
    late = await open_stream(bridge.url, params={"query": query},
                             headers={"Last-Event-ID": first.events[-1].last_event_id})
    assert late.frames[0]["code"] == "STREAM_EXPIRED"


async def test_no_grace_means_immediate_cancel_and_expired_resume(
    stub_factory: StubFactory, bridge_factory: BridgeFactory
) -> None:
    stub = stub_factory("--mode", "echo", "--echo-delimiter", ",", "--token-delay-ms", "20")
    bridge = bridge_factory(stub)
    query = ",".join(f"n{i}" for i in range(100))
    first = await open_stream(bridge.url, params={"query": query}, stop_after_tokens=2)
    assert (await stub.ended(first.frames[0]["request_id"]))["outcome"] == "cancelled"
    late = await open_stream(bridge.url, params={"query": query},
                             headers={"Last-Event-ID": first.events[-1].last_event_id})
    assert late.frames[0]["code"] == "STREAM_EXPIRED"


async def test_stop_while_reading_ends_with_stream_cancelled(
    stub_factory: StubFactory, bridge_factory: BridgeFactory
) -> None:
    stub = stub_factory("--mode", "echo", "--echo-delimiter", ",", "--token-delay-ms", "20")
    bridge = bridge_factory(stub)
    query = ",".join(f"d{i}" for i in range(500))
    parser = Parser()
    frames: list[dict[str, object]] = []
    async with (
        httpx.AsyncClient(base_url=bridge.url, timeout=30) as client,
        client.stream("GET", STREAM_PATH, params={"query": query}) as response,
    ):
        async for chunk in response.aiter_raw():
            for event in parser.feed(chunk):
                if event.type == "message":
                    frames.append(json.loads(event.data))
            if len(frames) == 3:  # metadata + two tokens: stop it from a second connection
                r = await client.delete(f"{STREAM_PATH}/{frames[0]['stream_id']}")
                assert r.status_code == 204
    assert frames[-1]["type"] == "error" and frames[-1]["code"] == "STREAM_CANCELLED"
    assert frames[-1]["retryable"] is False
    assert [f["type"] for f in frames].count("error") == 1
    assert (await stub.ended(str(frames[0]["request_id"])))["outcome"] == "cancelled"
