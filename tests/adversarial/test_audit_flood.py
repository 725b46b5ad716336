"""Floods that filled the audit store, or ran unlimited, replayed against real processes.

* Every refused credential was one ``auth_failed`` record and identity was checked before any
  limiter: one anonymous client wrote a record per request. Refusals are now charged to the
  client's address block (AUTH_FAILURE_RATE_LIMIT, then 429) and folded into at most two records
  per (subject, reason) and AUDIT_REFUSAL_WINDOW_S. A stream refused at the caller's stream cap
  (429 TOO_MANY_STREAMS) is folded the same way: it was written one record per refusal.
* Resumes, cancels and admin reads touched no limiter (a resume probe of an unknown id costs a
  Redis round trip); they now sit behind CONTROL_RATE_LIMIT, sized so that a browser's own
  reconnects never reach it.
* The budgets are per address block (an IPv6 /64), taken from ``client_ip`` (a spoofed
  X-Forwarded-For buys nothing) and shared by every instance through Redis.

Every process is real (stub, bridges, redis-server); records are read from the SQLite store the
bridge wrote, after a SIGTERM where the test needs the folded counts of a still-open window.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import signal
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import redis

from bridge.config import Settings
from tests.conftest import BridgeFactory, StubFactory
from tests.support.processes import Bridge, Stub
from tests.support.redis import redis_factory, redis_server
from tests.support.sse_client import STREAM_PATH, open_stream

__all__ = ["redis_factory", "redis_server"]  # fixtures used by this module

CHAT_PATH = "/api/v2/bali-zero/chat"
AUDIT_PATH = "/api/admin/audit"
SECRET = "audit-flood-attacks-secret-of-at-least-32-bytes"
GARBAGE = {"Authorization": "Bearer not.a.token"}

DEFAULTS = Settings()
AUTH_FAILURE_BUDGET, AUTH_FAILURE_WINDOW_S = DEFAULTS.auth_failure_rate_per_window
CONTROL_BUDGET, CONTROL_WINDOW_S = DEFAULTS.control_rate_per_window

FLOOD = 4000
# One subject and one reason leave at most two records per window (the first refusal, then one
# record with the folded count); a flood shorter than the window spans at most two windows.
FLOOD_RECORD_BOUND = 4


def record_bound(seconds: float, window_s: float = DEFAULTS.audit_refusal_window_s) -> int:
    """Records one subject and reason may leave over ``seconds``: FLOOD_RECORD_BOUND below a window.

    A loaded test machine can stretch a flood past one window; each further window adds two.
    """
    return FLOOD_RECORD_BOUND + 2 * math.floor(seconds / window_s)


def served_at_most(budget: int, window_s: int, seconds: float) -> int:
    """A moving window lets ``budget`` requests through per ``window_s``: over ``seconds``, this many."""
    return budget * (math.floor(seconds / window_s) + 1)


# The fastest cadence a legitimate browser reconnects at: EventSource waits at least the
# stream's `retry:` hint, and the smallest the bridge sends is 1000 ms, so at most one reconnect
# per second per stream; our client repeats an EventSource open that failed once over fetch (to
# see the status), so a reconnect is at most two requests; a caller holds at most
# MAX_STREAMS_PER_USER streams.
RECONNECTS_PER_STREAM_PER_MINUTE = 60
REQUESTS_PER_RECONNECT = 2
LEGIT_RECONNECT_REQUESTS_PER_MINUTE = (
    RECONNECTS_PER_STREAM_PER_MINUTE * REQUESTS_PER_RECONNECT * DEFAULTS.max_streams_per_user
)


def bearer(sub: str, role: str | None = None) -> dict[str, str]:
    claims: dict[str, Any] = {"sub": sub, "exp": int(time.time()) + 600}
    if role is not None:
        claims["role"] = role
    return {"Authorization": f"Bearer {jwt.encode(claims, SECRET, algorithm='HS256')}"}


@dataclass
class Flood:
    """What a flood got back: statuses, the 429s' Retry-After and error codes, and how long it took."""

    statuses: Counter[int] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)
    missing_retry_after: int = 0
    seconds: float = 0.0


async def flood(
    base_url: str,
    count: int,
    request: Callable[[int], tuple[str, str, dict[str, str]]],
    *,
    concurrency: int = 32,
) -> Flood:
    """Send ``count`` requests, ``request(i)`` giving (method, path, headers), ``concurrency`` at a time."""
    result = Flood()
    numbers = iter(range(count))

    async def worker(client: httpx.AsyncClient) -> None:
        for i in numbers:
            method, path, headers = request(i)
            response = await client.request(method, path, headers=headers)
            result.statuses[response.status_code] += 1
            if response.status_code == 429:
                result.codes[response.json()["error"]["code"]] += 1
                result.missing_retry_after += "retry-after" not in response.headers

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=base_url, timeout=30, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    result.seconds = time.monotonic() - started
    return result


def stored(db: Path, event_type: str) -> list[dict[str, Any]]:
    """The bodies of ``event_type`` records in the store, oldest first (read-only: the bridge may run)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT body FROM audit_records WHERE event_type = ? ORDER BY id", (event_type,))
        return [json.loads(body) for (body,) in rows.fetchall()]


async def stop(bridge: Bridge) -> None:
    """SIGTERM and wait: the shutdown writes the counts folded in the open window."""
    bridge.signal(signal.SIGTERM)
    assert await asyncio.to_thread(bridge.wait, 60) == 0, bridge.output()


async def until_stored(db: Path, event_type: str, done: Callable[[list[dict[str, Any]]], bool]) -> list[dict[str, Any]]:
    """Records of ``event_type`` once ``done`` holds for them (the writer thread commits in batches)."""
    deadline = time.monotonic() + 15
    while True:
        records = await asyncio.to_thread(stored, db, event_type)
        if done(records) or time.monotonic() > deadline:
            return records
        await asyncio.sleep(0.05)  # the store is another process's file: poll it


def counted(records: list[dict[str, Any]]) -> int:
    return sum(int(r["count"]) for r in records)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "audit.sqlite3"


def flood_bridge(bridge_factory: BridgeFactory, stub: Stub | None, db: Path, **env: str) -> Bridge:
    return bridge_factory(stub, JWT_SECRET=SECRET, AUDIT_DB=str(db), **env)


# -- failed authentication ------------------------------------------------------------------------


async def test_bad_token_flood_leaves_a_bounded_number_of_auth_failed_records(
    echo_stub: Stub, bridge_factory: BridgeFactory, db: Path
) -> None:
    bridge = flood_bridge(bridge_factory, echo_stub, db)
    result = await flood(bridge.url, FLOOD, lambda i: ("POST", CHAT_PATH, GARBAGE))
    refused = result.statuses[401]
    assert AUTH_FAILURE_BUDGET <= refused <= served_at_most(AUTH_FAILURE_BUDGET, AUTH_FAILURE_WINDOW_S, result.seconds)
    assert result.statuses == {401: refused, 429: FLOOD - refused}, result
    assert result.codes == {"TOO_MANY_AUTH_FAILURES": FLOOD - refused} and not result.missing_retry_after
    await stop(bridge)
    records = stored(db, "auth_failed")
    print(f"\n{FLOOD} bad tokens in {result.seconds:.1f}s left {len(records)} auth_failed records")
    assert len(records) <= record_bound(result.seconds), [(r["count"], r["ts"]) for r in records]
    assert counted(records) == FLOOD, "every refusal is counted, none recorded twice"
    assert {(r["client_ip"], r["reason"], r["path"]) for r in records} == {("127.0.0.1", "INVALID_TOKEN", CHAT_PATH)}


async def test_folded_auth_failures_are_written_with_their_count_at_shutdown(
    echo_stub: Stub, bridge_factory: BridgeFactory, db: Path
) -> None:
    """The first refusal is written at once; the rest of the window is one record, even on a stop."""
    bridge = flood_bridge(bridge_factory, echo_stub, db, AUDIT_REFUSAL_WINDOW_S="3600")
    result = await flood(bridge.url, 50, lambda i: ("POST", CHAT_PATH, GARBAGE), concurrency=4)
    assert result.statuses == {401: AUTH_FAILURE_BUDGET, 429: 50 - AUTH_FAILURE_BUDGET}, result
    while_running = await until_stored(db, "auth_failed", lambda r: len(r) >= 1)
    assert [r["count"] for r in while_running] == [1]
    await stop(bridge)
    first, folded = stored(db, "auth_failed")
    assert (first["count"], folded["count"]) == (1, 49)
    assert first["first_ts"] == first["ts"] <= folded["first_ts"] <= folded["ts"]
    assert {r["client_ip"] for r in (first, folded)} == {"127.0.0.1"}
    assert first["user_id"] == folded["user_id"] and folded["user_id"].startswith("anon:")


async def test_folded_auth_failures_are_written_when_their_window_closes(
    echo_stub: Stub, bridge_factory: BridgeFactory, db: Path
) -> None:
    bridge = flood_bridge(bridge_factory, echo_stub, db, AUDIT_REFUSAL_WINDOW_S="1")
    await flood(bridge.url, 10, lambda i: ("POST", CHAT_PATH, GARBAGE), concurrency=1)
    records = await until_stored(db, "auth_failed", lambda r: counted(r) == 10)
    assert counted(records) == 10, "the windows closed while the bridge runs: nothing waits for a stop"
    assert len(records) <= FLOOD_RECORD_BOUND and max(r["count"] for r in records) > 1, records


async def test_opening_streams_past_the_cap_in_a_loop_leaves_a_bounded_number_of_records(
    stub_factory: StubFactory, bridge_factory: BridgeFactory, db: Path
) -> None:
    """A user at MAX_STREAMS_PER_USER who keeps opening: each 429 was one ``rate_limited`` record."""
    stub = stub_factory("--mode", "echo", "--token-delay-ms", "100", "--repeat", "600")
    bridge = flood_bridge(bridge_factory, stub, db, MAX_STREAMS_PER_USER="1", RATE_LIMIT="100000/minute")
    holder = bearer("capped-user")
    first_token = asyncio.Event()
    held = asyncio.create_task(
        open_stream(bridge.url, params={"query": "held"}, headers=holder, first_token=first_token, timeout=120)
    )
    try:
        await asyncio.wait_for(first_token.wait(), 15)  # the user's one slot is taken
        attempts = 400
        result = await flood(bridge.url, attempts, lambda i: ("GET", STREAM_PATH + "?query=x", holder))
        assert result.statuses == {429: attempts} and result.codes == {"TOO_MANY_STREAMS": attempts}, result
        await stop(bridge)
    finally:
        held.cancel()
        await asyncio.gather(held, return_exceptions=True)
    records = [r for r in stored(db, "rate_limited") if r["reason"] == "TOO_MANY_STREAMS"]
    assert counted(records) == attempts, "every refusal is counted, none recorded twice"
    assert len(records) <= record_bound(result.seconds), [(r["count"], r["ts"]) for r in records]


async def test_bad_tokens_from_rotating_ipv6_addresses_of_one_64_share_one_budget_and_record(
    echo_stub: Stub, bridge_factory: BridgeFactory, db: Path
) -> None:
    """Behind a trusted proxy each request comes from another address of the client's /64."""
    bridge = flood_bridge(bridge_factory, echo_stub, db, TRUSTED_PROXIES="127.0.0.1/32")

    def rotating(i: int) -> tuple[str, str, dict[str, str]]:
        return "POST", CHAT_PATH, {**GARBAGE, "X-Forwarded-For": f"2001:db8:7:9:{i:x}::1"}

    result = await flood(bridge.url, 200, rotating, concurrency=8)
    assert result.statuses == {401: AUTH_FAILURE_BUDGET, 429: 200 - AUTH_FAILURE_BUDGET}, result
    other_block = await flood(
        bridge.url, 1, lambda i: ("POST", CHAT_PATH, {**GARBAGE, "X-Forwarded-For": "2001:db8:7:a::1"})
    )
    assert other_block.statuses == {401: 1}, "the next /64 has a budget of its own"
    await stop(bridge)
    records = stored(db, "auth_failed")
    blocks = Counter[str]()
    for record in records:
        blocks[record["client_ip"]] += record["count"]
    assert blocks == {"2001:db8:7:9::/64": 200, "2001:db8:7:a::/64": 1}
    assert len(records) <= FLOOD_RECORD_BOUND + 1


async def test_spoofed_x_forwarded_for_does_not_buy_a_fresh_auth_failure_budget(
    echo_stub: Stub, bridge_factory: BridgeFactory, db: Path
) -> None:
    """Without a trusted proxy the header is the client's own text: the socket peer is counted."""
    bridge = flood_bridge(bridge_factory, echo_stub, db)

    def spoofed(i: int) -> tuple[str, str, dict[str, str]]:
        return "POST", CHAT_PATH, {**GARBAGE, "X-Forwarded-For": f"198.51.100.{i % 250}"}

    result = await flood(bridge.url, 100, spoofed, concurrency=8)
    assert result.statuses == {401: AUTH_FAILURE_BUDGET, 429: 100 - AUTH_FAILURE_BUDGET}, result
    await stop(bridge)
    assert {r["client_ip"] for r in stored(db, "auth_failed")} == {"127.0.0.1"}


async def test_auth_failures_do_not_spend_the_request_limit_and_valid_tokens_still_pass(
    echo_stub: Stub, bridge_factory: BridgeFactory, db: Path
) -> None:
    """Separate key spaces: refusals at an address neither spend nor share its callers' limits."""
    bridge = flood_bridge(bridge_factory, echo_stub, db, RATE_LIMIT="5/minute")
    refused = await flood(bridge.url, AUTH_FAILURE_BUDGET + 5, lambda i: ("POST", CHAT_PATH, GARBAGE))
    assert refused.statuses[429] == 5, refused
    async with httpx.AsyncClient(base_url=bridge.url, timeout=30) as client:
        for who in (None, "alice"):
            headers = bearer(who) if who else {}
            reply = await client.post(CHAT_PATH, json={"query": "still served"}, headers=headers)
            assert reply.status_code == 200, reply.text
            assert reply.headers["ratelimit-remaining"] == "4", "the refusals did not touch this caller's limit"


# -- resume, cancel and admin floods --------------------------------------------------------------


def redis_calls(url: str) -> int:
    """Commands the Redis server has run so far (each one a round trip from some client)."""
    with redis.Redis.from_url(url) as client:
        stats = client.info("commandstats")
    return sum(int(entry["calls"]) for entry in stats.values())


def probe(i: int) -> tuple[str, str, dict[str, str]]:
    """A resume of a stream id nobody owns: with a resume store, each one asks Redis."""
    return "GET", f"{STREAM_PATH}?query=x", {"Last-Event-ID": f"{uuid.uuid4().hex}:{i % 50}"}


async def test_resume_probe_flood_is_refused_with_429_and_bounds_redis_round_trips(
    echo_stub: Stub, bridge_factory: BridgeFactory, db: Path, redis_server: str
) -> None:
    bridge = flood_bridge(bridge_factory, echo_stub, db, RESUME_STORE=redis_server, RESUME_GRACE_S="10")
    sample = 10
    before = redis_calls(redis_server)
    await flood(bridge.url, sample, probe, concurrency=1)
    per_probe = (redis_calls(redis_server) - before) / sample
    assert per_probe >= 1, "a probe of an unknown id asks the store"
    before = redis_calls(redis_server)
    result = await flood(bridge.url, FLOOD, probe)
    calls = redis_calls(redis_server) - before
    served = result.statuses[200]
    print(f"\n{FLOOD} resume probes in {result.seconds:.1f}s: {dict(result.statuses)}, {calls} Redis commands")
    assert CONTROL_BUDGET - sample <= served <= served_at_most(CONTROL_BUDGET, CONTROL_WINDOW_S, result.seconds)
    assert result.statuses == {200: served, 429: FLOOD - served}, result
    assert result.codes == {"RATE_LIMITED": FLOOD - served} and not result.missing_retry_after
    assert calls <= served * per_probe + 20, (calls, per_probe)
    await stop(bridge)
    limited = stored(db, "rate_limited")
    assert counted(limited) == FLOOD - served and len(limited) <= record_bound(result.seconds)


async def test_resume_probes_from_rotating_ipv6_addresses_of_one_64_share_one_budget(
    echo_stub: Stub, bridge_factory: BridgeFactory, db: Path
) -> None:
    bridge = flood_bridge(bridge_factory, echo_stub, db, TRUSTED_PROXIES="127.0.0.1/32", CONTROL_RATE_LIMIT="20/minute")

    def rotating_probe(i: int) -> tuple[str, str, dict[str, str]]:
        method, path, headers = probe(i)
        return method, path, {**headers, "X-Forwarded-For": f"2001:db8:7:9:{i:x}::1"}

    result = await flood(bridge.url, 25, rotating_probe, concurrency=4)
    assert result.statuses == {200: 20, 429: 5}, result


async def test_cancel_flood_is_refused_with_429(echo_stub: Stub, bridge_factory: BridgeFactory, db: Path) -> None:
    bridge = flood_bridge(bridge_factory, echo_stub, db)
    total = CONTROL_BUDGET + 100

    def cancel(i: int) -> tuple[str, str, dict[str, str]]:
        stream_id = uuid.uuid4().hex
        if i % 2:
            return "POST", f"{STREAM_PATH}/{stream_id}/cancel", {}
        return "DELETE", f"{STREAM_PATH}/{stream_id}", {}

    result = await flood(bridge.url, total, cancel)
    assert result.seconds < CONTROL_WINDOW_S, "the flood fits in one window"
    assert result.statuses == {404: CONTROL_BUDGET, 429: 100}, result
    assert result.codes == {"RATE_LIMITED": 100} and not result.missing_retry_after


async def test_admin_endpoint_flood_is_refused_with_429(
    echo_stub: Stub, bridge_factory: BridgeFactory, db: Path
) -> None:
    """Anonymous readers run out of failures; even an admin's reads are bounded."""
    bridge = flood_bridge(bridge_factory, echo_stub, db)
    anonymous = await flood(bridge.url, 200, lambda i: ("GET", AUDIT_PATH, {}))
    assert anonymous.seconds < AUTH_FAILURE_WINDOW_S, "the flood fits in one window"
    assert anonymous.statuses == {401: AUTH_FAILURE_BUDGET, 429: 200 - AUTH_FAILURE_BUDGET}, anonymous
    assert anonymous.codes == {"TOO_MANY_AUTH_FAILURES": 200 - AUTH_FAILURE_BUDGET}
    assert not anonymous.missing_retry_after
    admin = bearer("root", "admin")
    reads = await flood(bridge.url, CONTROL_BUDGET + 50, lambda i: ("GET", f"{AUDIT_PATH}?limit=1", admin))
    served = reads.statuses[200]
    assert CONTROL_BUDGET <= served <= served_at_most(CONTROL_BUDGET, CONTROL_WINDOW_S, reads.seconds)
    assert reads.statuses == {200: served, 429: CONTROL_BUDGET + 50 - served}, reads
    assert not reads.missing_retry_after
    await stop(bridge)
    refused = stored(db, "auth_failed")
    assert counted(refused) == 200 and len(refused) <= record_bound(anonymous.seconds)
    assert {(r["reason"], r["path"]) for r in refused} == {("UNAUTHORIZED", AUDIT_PATH)}


async def test_eventsource_reconnect_cadence_is_never_rate_limited(
    stub_factory: StubFactory, bridge_factory: BridgeFactory, db: Path
) -> None:
    """A minute of the fastest legitimate reconnects, sent at once, all served; the limit is still there.

    The window counts every request of the last minute, so a minute's reconnects in one burst
    is the harshest timing they can have. The stops that follow fit too, and the budget left is
    then used up by probes: the refusal comes exactly at CONTROL_RATE_LIMIT.
    """
    stub = stub_factory("--mode", "echo", "--echo-delimiter", ",")
    bridge = flood_bridge(bridge_factory, stub, db, RESUME_GRACE_S="60")
    streams = [await open_stream(bridge.url, params={"query": f"s{n},a,b,c"}) for n in range(3)]
    assert len(streams) == DEFAULTS.max_streams_per_user
    ids = [[e.last_event_id for e in reply.events if e.last_event_id] for reply in streams]
    assert all(len(i) >= 3 for i in ids), ids
    resumes = list(itertools.islice(itertools.cycle(ids), LEGIT_RECONNECT_REQUESTS_PER_MINUTE))

    def reconnect(i: int) -> tuple[str, str, dict[str, str]]:
        event_ids = resumes[i]
        last = event_ids[0] if i % 2 else event_ids[-1]  # replay from the start, or nothing left
        return "GET", f"{STREAM_PATH}?query=x", {"Last-Event-ID": last}

    result = await flood(bridge.url, len(resumes), reconnect, concurrency=8)
    # Served, every one: a replay (200) or "you have it all" (204). Which of the two a reconnect at
    # the final frame gets depends on the concurrent replays of the same stream, so only the sum
    # is fixed; a reader superseded before its first write still answers (never a 500).
    assert set(result.statuses) <= {200, 204} and result.statuses.total() == len(resumes), result
    async with httpx.AsyncClient(base_url=bridge.url, timeout=30) as client:
        for event_ids in ids:
            stream_id = event_ids[0].rsplit(":", 1)[0]
            stopped = await client.delete(f"{STREAM_PATH}/{stream_id}")
            assert stopped.status_code == 204, stopped.text
    left = CONTROL_BUDGET - len(resumes) - len(ids)
    assert left > 0, "headroom above the fastest legitimate cadence"
    rest = await flood(bridge.url, left + 1, probe, concurrency=8)
    assert rest.statuses == {200: left, 429: 1}, rest
    assert result.seconds + rest.seconds < CONTROL_WINDOW_S, "all of it within one window"


# -- across instances -----------------------------------------------------------------------------


async def test_auth_failure_and_control_budgets_are_shared_across_instances(
    echo_stub: Stub, bridge_factory: BridgeFactory, tmp_path: Path, redis_server: str
) -> None:
    """Two bridges on one Redis: spreading a flood over instances buys no extra budget."""
    shared = {"RATE_LIMIT_STORAGE": redis_server, "CONTROL_RATE_LIMIT": "40/minute"}
    first = flood_bridge(bridge_factory, echo_stub, tmp_path / "a.sqlite3", **shared)
    second = flood_bridge(bridge_factory, echo_stub, tmp_path / "b.sqlite3", **shared)
    half = AUTH_FAILURE_BUDGET // 2
    assert (await flood(first.url, half, lambda i: ("POST", CHAT_PATH, GARBAGE))).statuses == {401: half}
    rest = AUTH_FAILURE_BUDGET - half
    spent = await flood(second.url, rest + 5, lambda i: ("POST", CHAT_PATH, GARBAGE))
    assert spent.statuses == {401: rest, 429: 5}, spent

    def cancel(i: int) -> tuple[str, str, dict[str, str]]:
        return "DELETE", f"{STREAM_PATH}/{uuid.uuid4().hex}", {}

    assert (await flood(first.url, 20, cancel)).statuses == {404: 20}
    assert (await flood(second.url, 25, cancel)).statuses == {404: 20, 429: 5}
