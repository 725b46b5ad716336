"""Resume after a dropped connection: Last-Event-ID continues exactly where the client stopped."""

from __future__ import annotations

import asyncio
import json
import time

import httpx

from bridge.sse import Parser
from tests.conftest import BridgeFactory, StubFactory
from tests.support.sse_client import STREAM_PATH, lagging_reader, open_stream


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
    late = await open_stream(
        bridge.url, params={"query": query}, headers={"Last-Event-ID": first.events[-1].last_event_id}
    )
    assert late.status == 200
    assert "content-length" not in late.headers  # an event stream, like every other
    for name in ("content-type", "cache-control", "x-accel-buffering", "x-heartbeat-interval"):
        assert late.headers.get(name) == first.headers[name], name  # the same event-stream headers
    assert late.frames == [
        {"type": "error", "code": "STREAM_EXPIRED", "message": late.frames[0]["message"], "retryable": False}
    ]


async def test_other_user_cannot_resume(stub_factory: StubFactory, bridge_factory: BridgeFactory) -> None:
    stub = stub_factory("--mode", "echo", "--echo-delimiter", ",", "--token-delay-ms", "20")
    bridge = bridge_factory(stub, RESUME_GRACE_S="5", TRUSTED_PROXIES="127.0.0.1/32")
    query = ",".join(f"y{i}" for i in range(100))
    first = await open_stream(bridge.url, params={"query": query}, headers={"x-user-id": "alice"}, stop_after_tokens=3)
    last_id = first.events[-1].last_event_id
    theirs = await open_stream(
        bridge.url, params={"query": query}, headers={"x-user-id": "mallory", "Last-Event-ID": last_id}
    )
    # Answered like an unknown id (not a 404 of its own, which would reveal the id is live).
    assert theirs.status == 200 and theirs.tokens() == []
    assert [f["code"] for f in theirs.frames] == ["STREAM_EXPIRED"]
    mine = await open_stream(
        bridge.url, params={"query": query}, headers={"x-user-id": "alice", "Last-Event-ID": last_id}
    )
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
    late = await open_stream(
        bridge.url, params={"query": query}, headers={"Last-Event-ID": first.events[-1].last_event_id}
    )
    assert late.frames[0]["code"] == "STREAM_EXPIRED"


async def test_no_grace_means_immediate_cancel_and_expired_resume(
    stub_factory: StubFactory, bridge_factory: BridgeFactory
) -> None:
    stub = stub_factory("--mode", "echo", "--echo-delimiter", ",", "--token-delay-ms", "20")
    bridge = bridge_factory(stub)
    query = ",".join(f"n{i}" for i in range(100))
    first = await open_stream(bridge.url, params={"query": query}, stop_after_tokens=2)
    assert (await stub.ended(first.frames[0]["request_id"]))["outcome"] == "cancelled"
    late = await open_stream(
        bridge.url, params={"query": query}, headers={"Last-Event-ID": first.events[-1].last_event_id}
    )
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


async def test_a_reader_lagging_behind_a_finished_answer_can_still_resume(
    stub_factory: StubFactory, bridge_factory: BridgeFactory
) -> None:
    """The resume window starts when the reader is done, not when the upstream answer ended.

    Here the answer (8 MB) finishes upstream at once while a reader with a 4 KiB receive buffer
    is far behind; the reader stalls for twice RESUME_GRACE_S, drops and resumes. Counting the
    window from the upstream's end forgot the stream before the reader even left (STREAM_EXPIRED;
    the 7-minute soak met this under CPU pressure).
    """
    tokens = 8000
    stub = stub_factory("--mode", "echo", "--repeat", str(tokens))
    bridge = bridge_factory(
        stub,
        RESUME_GRACE_S="1",
        STREAM_WINDOW_FRAMES="10000",
        RESUME_BUFFER_FRAMES="10000",
        RESUME_BUFFER_BYTES=str(64 << 20),
    )
    word = "y" * 1000
    writer, seen, last_id = await lagging_reader(bridge.url, f"GET {STREAM_PATH}?query={word} HTTP/1.1\r\nHost: x\r\n")
    request_id = json.loads(seen.split(b"data: ", 1)[1].split(b"\n", 1)[0])["request_id"]
    assert (await stub.ended(request_id))["outcome"] == "completed"  # upstream done, reader far behind
    await asyncio.sleep(2)  # the scenario: the reader stalls for twice the grace window
    writer.transport.abort()
    resumed = await open_stream(bridge.url, params={"query": word}, headers={"Last-Event-ID": last_id})
    assert resumed.status == 200
    assert resumed.frames[-1]["type"] == "done", resumed.frames[-1]
    first_index = resumed.frames[0]["index"]
    assert [f["index"] for f in resumed.frames[:-1]] == list(range(first_index, tokens))


async def test_resume_right_after_completion_is_not_expired(
    stub_factory: StubFactory, bridge_factory: BridgeFactory
) -> None:
    """Every reconnect gets a whole resume window, counted from when its reader left.

    The answer ends upstream while the client is away; it comes back, catches up, cuts again and
    comes back once more, each time within RESUME_GRACE_S of leaving but, in all, later than
    RESUME_GRACE_S after the answer ended. Counting an ended stream's window once, from that end,
    forgot it under the reconnecting client: STREAM_EXPIRED "no longer available" instead of the
    rest of a completed answer (the 30-minute soak's 16 lost ``resume`` streams).
    """
    stub = stub_factory("--mode", "echo", "--echo-delimiter", ",", "--token-delay-ms", "5")
    bridge = bridge_factory(stub, RESUME_GRACE_S="2")
    query = ",".join(f"r{i}" for i in range(20))
    first = await open_stream(bridge.url, params={"query": query}, stop_after_tokens=3)
    assert (await stub.ended(first.frames[0]["request_id"]))["outcome"] == "completed"  # nobody reads
    await asyncio.sleep(1.4)  # the scenario: the client is away for 70 % of the window
    second = await open_stream(
        bridge.url,
        params={"query": query},
        headers={"Last-Event-ID": first.events[-1].last_event_id},
        stop_after_tokens=1,
    )
    assert second.tokens() == ["r3"]
    await asyncio.sleep(1.4)  # away again: 2.8 s after the answer ended, 1.4 s after this cut
    third = await open_stream(
        bridge.url, params={"query": query}, headers={"Last-Event-ID": second.events[-1].last_event_id}
    )
    assert third.status == 200
    assert third.frames[-1]["type"] == "done", third.frames[-1]
    assert third.tokens() == [f"r{i}" for i in range(4, 20)], "no duplicates, no gaps"


async def test_reconnecting_forever_does_not_keep_an_ended_stream(
    stub_factory: StubFactory, bridge_factory: BridgeFactory
) -> None:
    """Each reconnect re-opens an ended stream's resume window, but only up to a ceiling.

    A client replaying an old Last-Event-ID every fraction of a window would otherwise keep the
    ended stream, and its replay buffer, in the registry for ever (one per stream it ever
    opened): here the reconnects keep it for more than a window, then it is forgotten (4 windows).
    """
    stub = stub_factory("--mode", "echo", "--echo-delimiter", ",", "--token-delay-ms", "5")
    bridge = bridge_factory(stub, RESUME_GRACE_S="1")
    query = ",".join(f"k{i}" for i in range(10))
    first = await open_stream(bridge.url, params={"query": query}, stop_after_tokens=2)
    assert (await stub.ended(first.frames[0]["request_id"]))["outcome"] == "completed"
    ended = time.monotonic()
    old_id = first.events[-1].last_event_id
    served_for = 0.0
    while (elapsed := time.monotonic() - ended) < 12:  # three times the ceiling
        again = await open_stream(bridge.url, params={"query": query}, headers={"Last-Event-ID": old_id})
        if again.frames[-1]["type"] != "done":
            assert again.frames[-1]["code"] == "STREAM_EXPIRED", again.frames[-1]
            break
        served_for = elapsed
        await asyncio.sleep(0.2)  # the attack: back every fifth of a window
    else:
        raise AssertionError("an ended stream stayed resumable for 12 windows")
    assert served_for > 1, "the reconnects kept it past one window"
