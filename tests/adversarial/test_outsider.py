"""Regression tests for the smaller attacks of the outsider's pass, each named after its attack.

Everything runs for real on loopback: the stub RAG server, bridge processes and, for the
cross-instance stop, a redis-server that is killed and restarted. Each test failed on the code
before its fix (checked by reverting the fix and running it).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import httpx
import pytest
import redis.asyncio

from tests.conftest import BridgeFactory, StubFactory
from tests.support.processes import Bridge
from tests.support.redis import RedisFactory, redis_factory  # noqa: F401 (fixture used below)
from tests.support.sse_client import STREAM_PATH, open_stream

CHAT_PATH = "/api/v2/bali-zero/chat"
STATS_PATH = "/api/v2/bali-zero/stream-stats"
JSON = {"content-type": "application/json"}


async def upstream_log(bridge: Bridge, request_id: str) -> dict[str, Any]:
    """The bridge's log record of an upstream failure for ``request_id`` (awaited, not polled)."""

    def match(line: str) -> bool:
        return (
            line.startswith("{")
            and (rec := json.loads(line)).get("logger") == "bridge.upstream"
            and rec.get("request_id") == request_id
        )

    line = await asyncio.to_thread(bridge.wait_for_line, match, 10, stderr=True)
    return dict(json.loads(line))


# -- 1. lone surrogates ----------------------------------------------------------------------------

# Raw JSON bodies: "\ud800" is valid JSON and decodes to a lone surrogate, which no UTF-8 encoder accepts.
SURROGATE_BODIES = {
    "user_email": b'{"query":"hi","user_email":"a\\ud800@example.com"}',
    "user_role": b'{"query":"hi","user_role":"member\\udfff"}',
    "query": b'{"query":"hi \\ud83d"}',
    "conversation_history[0].content": b'{"query":"hi","conversation_history":[{"role":"user","content":"\\udc00"}]}',
}


@pytest.mark.parametrize("path", [STREAM_PATH, CHAT_PATH])
@pytest.mark.parametrize("field", list(SURROGATE_BODIES))
async def test_lone_surrogate_in_user_email_is_400_not_500(
    stub_factory: StubFactory, bridge_factory: BridgeFactory, path: str, field: str
) -> None:
    stub = stub_factory("--mode", "echo")
    bridge = bridge_factory(stub, RATE_LIMIT="100000/minute")
    async with httpx.AsyncClient(base_url=bridge.url) as client:
        r = await client.post(path, content=SURROGATE_BODIES[field], headers=JSON)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "INVALID_REQUEST"
        assert field in error["message"], "the 400 names the field"
        # The same check guards the GET form of the stream endpoint (history arrives as JSON text).
        if path == STREAM_PATH and field.startswith("conversation_history"):
            g = await client.get(
                path, params={"query": "hi", "conversation_history": '[{"role":"user","content":"\\udc00"}]'}
            )
            assert g.status_code == 400 and field in g.json()["error"]["message"]
        # A NUL in an identifier field is refused as well (it would truncate in C-string consumers).
        nul = await client.post(path, json={"query": "hi", "user_email": "a\x00b@example.com"})
        assert nul.status_code == 400 and "user_email" in nul.json()["error"]["message"]
        ok = await client.post(CHAT_PATH, json={"query": "still served"})
        assert ok.status_code == 200
    assert stub.stream_ends() == [], "nothing reached the upstream stream"
    assert "Traceback" not in "\n".join(bridge.stderr_lines)


# -- 2. HEAD ---------------------------------------------------------------------------------------


async def test_head_on_stream_endpoint_opens_no_upstream_and_uses_no_slot(
    stub_factory: StubFactory, bridge_factory: BridgeFactory
) -> None:
    stub = stub_factory("--mode", "rag")
    bridge = bridge_factory(stub, RATE_LIMIT="50/minute")
    async with httpx.AsyncClient(base_url=bridge.url, timeout=30) as client:
        first = await open_stream(bridge.url, params={"query": "visa"})
        assert first.status == 200 and first.frames[-1]["type"] == "done"
        remaining = int(first.headers["RateLimit-Remaining"])
        # HEAD GET-style, and HEAD carrying the JSON body that used to open a real upstream stream.
        for head in (
            client.build_request("HEAD", STREAM_PATH, params={"query": "visa"}),
            client.build_request("HEAD", STREAM_PATH, content=b'{"query":"visa"}', headers=JSON),
            client.build_request("HEAD", CHAT_PATH, content=b'{"query":"visa"}', headers=JSON),
        ):
            r = await client.send(head)
            assert r.status_code == 405, (head.url, r.status_code)
            allowed = {m.strip() for m in r.headers["Allow"].split(",")}
            assert "HEAD" not in allowed and "POST" in allowed
        stats = (await client.get(STATS_PATH)).json()
        assert stats["streams_opened"] == 1, "HEAD opened no stream"
        second = await open_stream(bridge.url, params={"query": "visa"})
        assert second.frames[-1]["type"] == "done"
        assert int(second.headers["RateLimit-Remaining"]) == remaining - 1, "HEAD used no rate-limit slot"
    await stub.ended(second.frames[0]["request_id"])
    ended = [e["request_id"] for e in stub.stream_ends()]
    assert ended == [first.frames[0]["request_id"], second.frames[0]["request_id"]], "the stub saw no HEAD"


# -- 3. cross-instance stop after a Redis outage ---------------------------------------------------


async def test_cross_instance_delete_while_owner_resubscribes_is_not_204(
    stub_factory: StubFactory,
    bridge_factory: BridgeFactory,
    redis_factory: RedisFactory,  # noqa: F811
) -> None:
    server = redis_factory()
    stub = stub_factory("--mode", "echo", "--echo-delimiter", ",", "--token-delay-ms", "20")
    env = {"RESUME_GRACE_S": "30", "RESUME_STORE": server.url, "TRUSTED_PROXIES": "127.0.0.1/32"}
    a, b = bridge_factory(stub, **env), bridge_factory(stub, **env)
    query = ",".join(f"w{i}" for i in range(1500))  # 30 s of tokens: only a stop ends it in time
    first = await open_stream(a.url, params={"query": query}, stop_after_tokens=2)
    stream_id, request_id = first.frames[0]["stream_id"], first.frames[0]["request_id"]
    store = redis.asyncio.Redis.from_url(server.url)
    try:
        meta = await store.dump(f"bzb:meta:{stream_id}")
        assert meta is not None, "the owner mirrored the stream's meta record"
    finally:
        await store.aclose()

    server.kill()
    # The outage: long enough for A's cancel subscriber to fail repeatedly and back off
    # (the old backoff reached 3.2 s by then). A scenario duration, not a synchronisation wait.
    await asyncio.sleep(3.5)
    server = redis_factory(server.port)
    store = redis.asyncio.Redis.from_url(server.url)
    try:
        # As a persistent Redis (or a promoted replica) would have it: the stream's meta survived.
        await store.restore(f"bzb:meta:{stream_id}", 60_000, meta, replace=True)
    finally:
        await store.aclose()

    restarted = time.monotonic()
    statuses: list[int] = []
    async with httpx.AsyncClient(base_url=b.url) as client:
        while True:
            r = await client.delete(f"{STREAM_PATH}/{stream_id}")
            statuses.append(r.status_code)
            if r.status_code == 204:
                break
            assert r.status_code == 503, r.text
            error = r.json()["error"]
            assert error["code"] in {"OWNER_UNREACHABLE", "RESUME_UNAVAILABLE"}
            assert int(r.headers["Retry-After"]) >= 1
            assert time.monotonic() - restarted < 10, f"the owner never heard the stop: {statuses}"
            await asyncio.sleep(0.2)  # the client's retry pace (Retry-After allows 1 s; faster is fine)
    stopped, stopped_wall = time.monotonic(), time.time()
    try:
        end = await stub.ended(request_id, timeout=5)
    except TimeoutError:
        pytest.fail(f"answered {statuses} but the owner's stream kept running: the stop reached no one")
    assert end["outcome"] == "cancelled", "a 204 means the owner stopped the stream"
    assert end["ended_at"] - stopped_wall < 2, "stopped by the stop, not by anything later"
    assert stopped - restarted < 3, f"the owner resubscribed promptly after Redis returned: {statuses}"


# -- 4. framing the demo ---------------------------------------------------------------------------


async def test_static_html_cannot_be_framed(echo_stub: Any, bridge_factory: BridgeFactory) -> None:
    bridge = bridge_factory(echo_stub)
    async with httpx.AsyncClient(base_url=bridge.url) as client:
        for path in ("/", "/static/index.html", "/static/./index.html"):
            for method in ("GET", "HEAD"):
                r = await client.request(method, path)
                assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), path
                assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"], (method, path)
                assert r.headers["X-Frame-Options"] == "DENY", (method, path)
                assert r.headers["X-Content-Type-Options"] == "nosniff", (method, path)
        for path in (
            "/static/demo.js",
            "/static/demo.css",
            "/static/bali-zero-stream-client.js",
            "/nope",
            "/static/nope.html",
        ):
            r = await client.get(path)
            assert r.headers["X-Content-Type-Options"] == "nosniff", path


# -- 5. internals in 503 messages ------------------------------------------------------------------

LEAKS = re.compile(
    r"ipv4|ipv6|127\.0\.0\.1|grpc|connection refused|failed to connect|stub failure|:\d{2,5}\b", re.IGNORECASE
)


async def test_unavailable_message_hides_upstream_address(
    stub_factory: StubFactory, bridge_factory: BridgeFactory
) -> None:
    gone = stub_factory("--mode", "echo")
    gone.stop()  # its port is now closed: every call fails with gRPC's connect details
    bridge = bridge_factory(gone, LOG_LEVEL="WARNING", UPSTREAM_CONNECT_TIMEOUT_S="2")
    visible: list[str] = []
    async with httpx.AsyncClient(base_url=bridge.url, timeout=30) as client:
        r = await client.get(STREAM_PATH, params={"query": "hi"}, headers={"x-request-id": "leak-stream-1"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "UPSTREAM_UNAVAILABLE"
        visible.append(r.text)
        r = await client.post(CHAT_PATH, json={"query": "hi"}, headers={"x-request-id": "leak-chat-1"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "UPSTREAM_UNAVAILABLE"
        visible.append(r.text)

    failing = stub_factory("--mode", "echo", "--echo-delimiter", ",", "--fail-after", "2")
    late = bridge_factory(failing)
    reply = await open_stream(late.url, params={"query": "a,b,c,d"}, headers={"x-request-id": "leak-frame-1"})
    assert reply.tokens() == ["a", "b"]
    assert reply.frames[-1]["type"] == "error" and reply.frames[-1]["code"] == "UPSTREAM_UNAVAILABLE"
    visible.append(reply.body.decode() + "".join(e.data for e in reply.events))
    async with httpx.AsyncClient(base_url=late.url) as client:
        r = await client.post(CHAT_PATH, json={"query": "a,b,c,d"}, headers={"x-request-id": "leak-chat-2"})
        assert r.status_code == 503
        visible.append(r.text)

    for text in visible:
        assert not LEAKS.search(text), text
        assert str(gone.port) not in text and str(failing.port) not in text
    # The operator still gets the details, tied to the request.
    details = {rid: (await upstream_log(bridge, rid))["grpc_details"] for rid in ("leak-stream-1", "leak-chat-1")}
    details |= {rid: (await upstream_log(late, rid))["grpc_details"] for rid in ("leak-frame-1", "leak-chat-2")}
    assert re.search(r"127\.0\.0\.1|connect", details["leak-stream-1"], re.IGNORECASE)
    assert "stub failure after 2 tokens" in details["leak-frame-1"]
