"""Attacks on who the bridge thinks is calling, each replayed against real processes.

* A caller sending ``x-user-id: alice`` through a trusted proxy must not become the verified
  token user ``alice``: not resume, stop or cancel her streams, not spend her rate limit or stream
  slots, not be audited as her. Tested directly against a bridge that trusts its loopback peer and
  through the real nginx of ``deploy/nginx.conf``, which must drop a client's own ``x-user-id``.
* Several ``Authorization`` (or ``x-user-id``) headers are refused, never one of them picked.
* A resume or stop for another caller's live stream answers exactly like one for an unknown id
  (same status, headers, body and store round trips), so stream ids cannot be probed.

Every process is real (stub, bridges, nginx, redis-server); waits are on frames and records.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
import pytest
import redis.asyncio

from bridge.sse import Parser
from tests.conftest import BridgeFactory, StubFactory
from tests.support.nginx import TEMPLATE, NginxFactory, nginx_factory
from tests.support.processes import Bridge, Stub
from tests.support.redis import redis_factory, redis_server
from tests.support.sse_client import STREAM_PATH, StreamReply, open_stream

__all__ = ["nginx_factory", "redis_factory", "redis_server"]  # fixtures used by this module

CHAT_PATH = "/api/v2/bali-zero/chat"
AUDIT_PATH = "/api/admin/audit"
SECRET = "identity-attacks-secret-of-at-least-32-bytes"
# Tokens optional (anonymous callers are served), the loopback peer is a trusted proxy.
TRUSTING = {
    "JWT_SECRET": SECRET,
    "TRUSTED_PROXIES": "127.0.0.1/32",
    "RESUME_GRACE_S": "10",
    "RATE_LIMIT": "100000/minute",
    "MAX_STREAMS_PER_USER": "50",
}
SPOOFED_ALICE = {"x-user-id": "alice"}
QUERY = ",".join(f"w{i}" for i in range(60))
WORDS = [f"w{i}" for i in range(60)]


def token(sub: str, role: str | None = None) -> str:
    claims: dict[str, Any] = {"sub": sub, "exp": int(time.time()) + 600}
    if role is not None:
        claims["role"] = role
    return jwt.encode(claims, SECRET, algorithm="HS256")


def bearer(sub: str, role: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(sub, role)}"}


def paced_stub(stub_factory: StubFactory, delay_ms: int = 25) -> Stub:
    return stub_factory("--mode", "echo", "--echo-delimiter", ",", "--token-delay-ms", str(delay_ms))


async def detached_stream(base_url: str, headers: dict[str, str], tokens: int = 3) -> StreamReply:
    """Open a stream, read ``tokens`` tokens, hang up: the stream waits in its resume window."""
    first = await open_stream(base_url, params={"query": QUERY}, headers=headers, stop_after_tokens=tokens)
    assert first.status == 200 and first.tokens() == WORDS[:tokens], first
    return first


async def resume(base_url: str, headers: dict[str, str], last_id: str) -> StreamReply:
    return await open_stream(base_url, params={"query": QUERY}, headers={**headers, "Last-Event-ID": last_id})


def assert_refused_resume(reply: StreamReply) -> None:
    """The unknown-stream answer: one non-retryable STREAM_EXPIRED frame and not one token."""
    assert reply.status == 200, reply
    assert reply.tokens() == []
    assert [(f["type"], f["code"], f["retryable"]) for f in reply.frames] == [("error", "STREAM_EXPIRED", False)]


async def stop_requests(base_url: str, stream_id: str, headers: dict[str, str]) -> list[httpx.Response]:
    """Both ways to stop a stream: DELETE …/{id} and POST …/{id}/cancel."""
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        return [
            await client.delete(f"{STREAM_PATH}/{stream_id}", headers=headers),
            await client.post(f"{STREAM_PATH}/{stream_id}/cancel", headers=headers),
        ]


async def chat(base_url: str, headers: list[tuple[str, str]] | dict[str, str]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        return await client.post(CHAT_PATH, json={"query": "hello"}, headers=headers)


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code and error["message"], error


@dataclass
class HeldStream:
    """An open stream: its response (headers) and its body, read so far and still to come."""

    response: httpx.Response
    chunks: AsyncIterator[bytes]
    parser: Parser = field(default_factory=Parser)
    seen: list[dict[str, Any]] = field(default_factory=list)

    @property
    def stream_id(self) -> str:
        return self.response.headers["x-connection-id"]

    async def read(self, chunks: int | None = None) -> list[dict[str, Any]]:
        """Every data frame so far, after reading ``chunks`` more chunks (None: to the end)."""
        async for chunk in self.chunks:
            self.seen += [json.loads(e.data) for e in self.parser.feed(chunk) if e.type == "message"]
            if chunks is not None and (chunks := chunks - 1) <= 0:
                break
        return self.seen


@contextlib.asynccontextmanager
async def held_stream(base_url: str, headers: dict[str, str]) -> AsyncIterator[HeldStream]:
    """A stream kept open (its first chunk read) for the duration of the block."""
    async with (
        httpx.AsyncClient(base_url=base_url, timeout=30) as client,
        client.stream("GET", STREAM_PATH, params={"query": QUERY}, headers=headers) as response,
    ):
        assert response.status_code == 200, await response.aread()
        held = HeldStream(response, response.aiter_raw())
        await held.read(1)  # the metadata frame: the stream (and its slot) is open
        yield held


async def audit_records(bridge: Bridge, count: int, **filters: str) -> list[dict[str, Any]]:
    """Records matching ``filters`` read by a verified admin, once ``count`` of them were written."""
    deadline = time.monotonic() + 10
    async with httpx.AsyncClient(base_url=bridge.url, timeout=10) as client:
        while True:
            response = await client.get(AUDIT_PATH, params=filters, headers=bearer("root", "admin"))
            assert response.status_code == 200, response.text
            records: list[dict[str, Any]] = response.json()["records"]
            if len(records) >= count or time.monotonic() > deadline:
                return records
            await asyncio.sleep(0.05)  # the trail's writer thread flushes in batches: poll its output


# -- proxy-asserted "alice" versus the verified token sub=alice, directly against the bridge ---------


async def test_proxy_asserted_alice_cannot_resume_token_alice_stream(
    stub_factory: StubFactory, bridge_factory: BridgeFactory
) -> None:
    bridge = bridge_factory(paced_stub(stub_factory), **TRUSTING)
    alice = bearer("alice")
    first = await detached_stream(bridge.url, alice)
    last_id = first.events[-1].last_event_id
    assert_refused_resume(await resume(bridge.url, SPOOFED_ALICE, last_id))
    mine = await resume(bridge.url, alice, last_id)
    assert mine.tokens() == WORDS[3:], "Alice still gets her whole answer"
    assert mine.frames[-1]["type"] == "done"


async def test_proxy_asserted_alice_cannot_take_over_token_alice_live_connection(
    stub_factory: StubFactory, bridge_factory: BridgeFactory
) -> None:
    """The reproduced attack: the spoofer's resume took Alice's tokens and ended her connection."""
    bridge = bridge_factory(paced_stub(stub_factory), **TRUSTING)
    async with held_stream(bridge.url, bearer("alice")) as alice:
        assert_refused_resume(await resume(bridge.url, SPOOFED_ALICE, f"{alice.stream_id}:1"))
        frames = await alice.read()
    assert [f["text"] for f in frames if f["type"] == "token"] == WORDS
    assert frames[-1]["type"] == "done", "Alice's own connection ends with its final frame"


async def test_proxy_asserted_alice_cannot_delete_or_cancel_token_alice_stream(
    stub_factory: StubFactory, bridge_factory: BridgeFactory
) -> None:
    stub = paced_stub(stub_factory)
    bridge = bridge_factory(stub, **TRUSTING)
    alice = bearer("alice")
    first = await detached_stream(bridge.url, alice)
    stream_id = first.frames[0]["stream_id"]
    for response in await stop_requests(bridge.url, stream_id, SPOOFED_ALICE):
        assert_error(response, 404, "STREAM_NOT_FOUND")
    mine = await resume(bridge.url, alice, first.events[-1].last_event_id)
    assert mine.frames[-1]["type"] == "done", "the stream was not stopped"
    assert (await stub.ended(first.frames[0]["request_id"]))["outcome"] == "completed"


async def test_proxy_asserted_alice_does_not_spend_token_alice_rate_limit(
    echo_stub: Stub, bridge_factory: BridgeFactory
) -> None:
    bridge = bridge_factory(echo_stub, **{**TRUSTING, "RATE_LIMIT": "3/minute"})
    spent = [(await chat(bridge.url, SPOOFED_ALICE)).status_code for _ in range(4)]
    assert spent == [200, 200, 200, 429], "the spoofer has a budget of its own, and used it up"
    assert (await chat(bridge.url, bearer("alice"))).status_code == 200, "Alice's budget is untouched"


async def test_proxy_asserted_alice_does_not_take_token_alice_stream_slots(
    stub_factory: StubFactory, bridge_factory: BridgeFactory
) -> None:
    bridge = bridge_factory(paced_stub(stub_factory, 500), **{**TRUSTING, "MAX_STREAMS_PER_USER": "1"})
    async with held_stream(bridge.url, SPOOFED_ALICE):
        async with httpx.AsyncClient(base_url=bridge.url, timeout=10) as client:
            second = await client.get(STREAM_PATH, params={"query": "x"}, headers=SPOOFED_ALICE)
            assert_error(second, 429, "TOO_MANY_STREAMS")  # the spoofer's own single slot is taken
        async with held_stream(bridge.url, bearer("alice")):
            pass  # Alice's slot is hers: opening a stream succeeded


async def test_proxy_asserted_alice_is_audited_with_the_proxy_kind(
    echo_stub: Stub, bridge_factory: BridgeFactory
) -> None:
    bridge = bridge_factory(echo_stub, **TRUSTING)
    assert (await chat(bridge.url, SPOOFED_ALICE)).status_code == 200
    assert (await chat(bridge.url, bearer("alice"))).status_code == 200
    assert (await chat(bridge.url, {})).status_code == 200
    records = await audit_records(bridge, 3, event_type="chat")
    kinds = sorted((r["user_id"].split(":")[0], r["identity_kind"]) for r in records)
    assert kinds == [("alice", "proxy"), ("alice", "token"), ("anon", "anonymous")], records


# -- the same attacker through the real nginx of deploy/nginx.conf --------------------------------


def test_every_nginx_server_block_clears_client_x_user_id() -> None:
    """Checked on the file, so a server block added later (another listener) cannot forget it.

    A ``proxy_set_header`` inside a location drops every server-level one for that location,
    the clearing of ``x-user-id`` included, so locations must set none.
    """
    text = "\n".join(line.split("#", 1)[0] for line in TEMPLATE.read_text(encoding="utf-8").splitlines())
    servers = re.split(r"^\s*server\s*\{\s*$", text, flags=re.MULTILINE)[1:]
    assert servers, "no server block"
    for server in servers:
        assert re.search(r'^\s*proxy_set_header\s+x-user-id\s+""\s*;', server, flags=re.MULTILINE | re.I), server
        for location in re.findall(r"location[^{]*\{([^}]*)\}", server):
            assert "proxy_set_header" not in location, location


@pytest.mark.nginx
async def test_client_x_user_id_through_nginx_cannot_resume_or_stop_token_alice_stream(
    stub_factory: StubFactory, bridge_factory: BridgeFactory, nginx_factory: NginxFactory
) -> None:
    bridge = bridge_factory(paced_stub(stub_factory), **TRUSTING)
    nginx = nginx_factory(bridge.url, bridge.url)
    alice = bearer("alice")
    first = await detached_stream(nginx.url, alice)
    last_id = first.events[-1].last_event_id
    assert_refused_resume(await resume(nginx.url, SPOOFED_ALICE, last_id))
    for response in await stop_requests(nginx.url, first.frames[0]["stream_id"], SPOOFED_ALICE):
        assert_error(response, 404, "STREAM_NOT_FOUND")
    mine = await resume(nginx.url, alice, last_id)
    assert mine.tokens() == WORDS[3:] and mine.frames[-1]["type"] == "done"


@pytest.mark.nginx
async def test_client_x_user_id_through_nginx_is_not_believed(
    echo_stub: Stub, bridge_factory: BridgeFactory, nginx_factory: NginxFactory
) -> None:
    """nginx clears a client's x-user-id: rotating it gives no fresh budget, and the record says anonymous."""
    bridge = bridge_factory(echo_stub, **{**TRUSTING, "RATE_LIMIT": "2/minute"})
    nginx = nginx_factory(bridge.url, bridge.url)
    statuses = [(await chat(nginx.url, {"x-user-id": name})).status_code for name in ("alice", "bob", "carol")]
    assert statuses == [200, 200, 429], "every request is keyed by the client's address"
    records = await audit_records(bridge, 2, event_type="chat")
    assert {r["identity_kind"] for r in records} == {"anonymous"}, records


# -- several Authorization / x-user-id headers ------------------------------------------------------


async def both_endpoints(bridge: Bridge, headers: list[tuple[str, str]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=bridge.url, timeout=30) as client:
        return [
            await client.post(CHAT_PATH, json={"query": "hello"}, headers=headers),
            await client.get(STREAM_PATH, params={"query": "hello"}, headers=headers),
        ]


async def test_empty_then_bad_authorization_header_is_401_not_anonymous(
    echo_stub: Stub, bridge_factory: BridgeFactory
) -> None:
    bridge = bridge_factory(echo_stub, **TRUSTING)
    for headers in (
        [("Authorization", ""), ("Authorization", "Bearer not-a-token")],
        [("Authorization", "Bearer not-a-token"), ("Authorization", "")],
        [("Authorization", "")],
    ):  # blank values: tests/unit/test_auth.py (h11 will not send them)
        for response in await both_endpoints(bridge, headers):
            assert_error(response, 401, "INVALID_TOKEN")
            assert response.headers["WWW-Authenticate"].startswith("Bearer")


async def test_good_then_bad_authorization_header_is_401_not_the_good_one(
    echo_stub: Stub, bridge_factory: BridgeFactory
) -> None:
    bridge = bridge_factory(echo_stub, **TRUSTING)
    good = f"Bearer {token('alice')}"
    for headers in (
        [("Authorization", good), ("Authorization", "Bearer not-a-token")],
        [("Authorization", good), ("Authorization", good)],
    ):
        for response in await both_endpoints(bridge, headers):
            assert_error(response, 401, "INVALID_TOKEN")
    assert [r.status_code for r in await both_endpoints(bridge, [("Authorization", good)])] == [200, 200]


async def test_two_x_user_id_headers_from_a_trusted_proxy_are_400_not_a_pick(
    echo_stub: Stub, bridge_factory: BridgeFactory
) -> None:
    bridge = bridge_factory(echo_stub, **TRUSTING)
    for response in await both_endpoints(bridge, [("x-user-id", "alice"), ("x-user-id", "mallory")]):
        assert_error(response, 400, "DUPLICATE_HEADER")
    records = await audit_records(bridge, 2, event_type="auth_failed")
    assert {r["reason"] for r in records} == {"DUPLICATE_HEADER"}, records


# -- the resume oracle: someone else's live stream looks exactly like an unknown one ----------------


def comparable(response: httpx.Response, stream_id: str) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (minus the clock) and body, with the probed id replaced by a placeholder."""
    headers = {k: v for k, v in response.headers.items() if k != "date"}
    return response.status_code, headers, response.content.replace(stream_id.encode(), b"<id>")


async def probe(base_url: str, stream_id: str, headers: dict[str, str]) -> list[tuple[int, dict[str, str], bytes]]:
    """What an attacker sees for ``stream_id``: a resume, a DELETE and a POST cancel."""
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        answers = [
            await client.get(STREAM_PATH, params={"query": "q"}, headers={**headers, "Last-Event-ID": f"{stream_id}:3"})
        ]
    answers += await stop_requests(base_url, stream_id, headers)
    return [comparable(a, stream_id) for a in answers]


def unknown_like(stream_id: str) -> str:
    """An id of the same length and alphabet that no stream has."""
    return ("Z" if stream_id[0] != "Z" else "Y") + stream_id[1:]


async def test_resume_oracle_foreign_live_stream_answers_like_unknown_id(
    stub_factory: StubFactory, bridge_factory: BridgeFactory
) -> None:
    bridge = bridge_factory(paced_stub(stub_factory, 200), **TRUSTING)
    async with held_stream(bridge.url, bearer("alice")) as alice:
        stream_id = alice.stream_id
        for attacker in ({}, SPOOFED_ALICE, bearer("mallory")):
            foreign = await probe(bridge.url, stream_id, attacker)
            unknown = await probe(bridge.url, unknown_like(stream_id), attacker)
            assert foreign == unknown, attacker
            status, _, body = foreign[0]
            assert status == 200 and b'"code":"STREAM_EXPIRED"' in body and b'"retryable":false' in body
            assert [status for status, _, _ in foreign[1:]] == [404, 404]


async def hgetall_calls(client: redis.asyncio.Redis) -> int:
    stats: dict[str, Any] = await client.info("commandstats")
    return int(stats.get("cmdstat_hgetall", {}).get("calls", 0))


@pytest.mark.redis
async def test_resume_oracle_with_shared_store_costs_the_same_round_trips(
    stub_factory: StubFactory, bridge_factory: BridgeFactory, redis_server: str
) -> None:
    """Across instances too; and a foreign stream held locally still asks the store, like an unknown id."""
    stub = paced_stub(stub_factory, 200)
    env = {**TRUSTING, "RESUME_STORE": redis_server}
    a, b = bridge_factory(stub, **env), bridge_factory(stub, **env)
    store = redis.asyncio.Redis.from_url(redis_server)
    try:
        async with held_stream(a.url, bearer("alice")) as alice:
            stream_id = alice.stream_id
            await wait_for(lambda: store.exists(f"bzb:meta:{stream_id}"), "the owner mirrors its meta record")
            for where in (a, b):  # the owner instance (local session) and another instance
                seen: list[tuple[list[tuple[int, dict[str, str], bytes]], int]] = []
                for probed in (stream_id, unknown_like(stream_id)):
                    before = await hgetall_calls(store)
                    answers = await probe(where.url, probed, SPOOFED_ALICE)
                    seen.append((answers, await hgetall_calls(store) - before))
                assert seen[0] == seen[1], (where.url, seen)
                assert seen[0][1] == 3, "one store lookup per resume, DELETE and cancel"
    finally:
        await store.aclose()


async def wait_for(probe: Callable[[], Awaitable[int | bool]], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not await probe():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.02)  # polling an external store's state; there is no event to await
