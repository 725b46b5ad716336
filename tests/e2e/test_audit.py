"""The GDPR audit trail end to end: real stub and bridge processes, the store read back with the CLI.

What is checked here, against the running system rather than the audit package alone:

* every event type the bridge produces lands in the store with exactly its allowed fields,
  ``email`` only for verified callers and the client IP only on security events;
* neither the raw query nor any bearer token reaches any file the run produced or the processes'
  output;
* SIGTERM with 200 streams in flight loses no record, and the chain still verifies;
* the admin endpoint over HTTP (who may read, filters, pagination, chain status, reads audited);
* ``audit backup`` while the bridge writes, ``audit purge`` while it writes, ``audit export | head``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from bridge.audit.events import ALLOWED_FIELDS, OPTIONAL_FIELDS
from bridge.audit.keys import key_path, load_keys
from bridge.audit.trail import AuditTrail
from bridge.config import Settings
from bridge.sse import Parser
from bridge.types import Identity
from tests.conftest import StubFactory
from tests.support.audit import audit_cli as cli
from tests.support.processes import ROOT, Bridge, Stub, base_env
from tests.support.redis import redis_factory, redis_server  # noqa: F401  (fixtures)
from tests.support.sse_client import STREAM_PATH, open_stream
from tests.support.workers import two_workers

JWT_SECRET = "audit-e2e-secret-" + "x" * 32
UNLIMITED = "100000/minute"
CHAT_PATH = "/api/v2/bali-zero/chat"
ADMIN_PATH = "/api/admin/audit"
END_TYPES = ("stream_completed", "stream_cancelled", "stream_failed")
RECORD_META = frozenset({"id", "prev_hash", "hash"})


# -- processes -------------------------------------------------------------------------------------


class AuditBridge(Bridge):
    """A bridge that also tells when its stdout and stderr have been read to the end.

    Only then is the captured output complete enough to assert that something is *absent* from it.
    """

    def __init__(self, env: Mapping[str, str]) -> None:
        self.closed_pipes = 0
        super().__init__(env)

    def _pump(self, stream: Any, sink: list[str]) -> None:
        try:
            super()._pump(stream, sink)
        finally:
            with self._cond:
                self.closed_pipes += 1
                self._cond.notify_all()

    def sigterm_and_wait(self, timeout: float = 60) -> int:
        """SIGTERM, wait for the exit and for both pipes to be drained; the exit code."""
        self.signal(signal.SIGTERM)
        code = self.wait(timeout)
        with self._cond:
            if not self._cond.wait_for(lambda: self.closed_pipes == 2, timeout):
                raise TimeoutError("bridge output not drained")
        return code

    def all_output(self) -> str:
        with self._cond:
            return "\n".join(self.lines + self.stderr_lines)


BridgeStarter = Callable[..., AuditBridge]


@pytest.fixture
def start_bridge() -> Iterator[BridgeStarter]:
    started: list[AuditBridge] = []

    def start(stub: Stub, db: Path, **env: str) -> AuditBridge:
        full = {
            "ENABLE_SSE_STREAMING": "true",
            "AUDIT_DB": str(db),
            "LOG_LEVEL": "WARNING",
            "RAG_TARGET": stub.target,
            **env,
        }
        bridge = AuditBridge(full)
        started.append(bridge)
        return bridge

    yield start
    for bridge in started:
        bridge.stop()


def workers_env(request: pytest.FixtureRequest, workers: int, **env: str) -> dict[str, str]:
    """``env``, plus a shared Redis for a bridge of two workers."""
    if workers > 1:
        return two_workers(request.getfixturevalue("redis_server"), **env)
    return env


async def acli(db: Path, *args: str) -> tuple[int, str, str]:
    """``cli`` without blocking the event loop (for commands run while the test drives traffic)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge",
        "audit",
        *args,
        env=base_env({"AUDIT_DB": str(db)}),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def export(db: Path) -> list[dict[str, Any]]:
    result = cli(db, "export")
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def assert_verifies(db: Path) -> str:
    result = cli(db, "verify")
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "audit chain OK" in result.stdout
    return result.stdout


# -- tokens and requests ---------------------------------------------------------------------------


def token(sub: str, *, role: str = "member", email: str | None = None) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {"sub": sub, "iat": now, "exp": now + 600, "role": role}
    if email is not None:
        claims["email"] = email
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


def bearer(jwt_token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {jwt_token}"}


async def chat(
    client: httpx.AsyncClient, query: str, headers: Mapping[str, str] | None = None, **fields: str
) -> httpx.Response:
    return await client.post(CHAT_PATH, json={"query": query, **fields}, headers=dict(headers or {}))


def fields_of(record: Mapping[str, Any]) -> set[str]:
    return set(record) - RECORD_META


# -- every event, exactly its fields, nothing leaked -----------------------------------------------


async def test_every_event_has_exactly_its_fields_and_nothing_leaks(
    stub_factory: StubFactory, start_bridge: BridgeStarter, tmp_path: Path
) -> None:
    marker = f"zqmarker{secrets.token_hex(8)}"
    db = tmp_path / "store" / "audit.sqlite3"
    logs = tmp_path / "logs"
    log_env = {
        "LOG_FILE": str(logs / "combined.log"),
        "ERROR_LOG_FILE": str(logs / "error.log"),
        "LOG_LEVEL": "DEBUG",
        "JWT_SECRET": JWT_SECRET,
        "RATE_LIMIT": "3/minute",
    }
    alice = token("alice", email="alice@example.com")
    bob = token("bob", email="bob@example.com")
    carol = token("carol", email="carol@example.com")
    admin = token("root", role="admin", email="ops@example.com")
    garbage = f"garbage.{secrets.token_hex(12)}.token"
    emails = {
        "alice": "alice@example.com",
        "bob": "bob@example.com",
        "carol": "carol@example.com",
        "root": "ops@example.com",
    }

    # Bridge 1: paced echo stub, so a stream can be cut off mid-flight.
    good = stub_factory("--mode", "echo", "--token-delay-ms", "20")
    first = start_bridge(good, db, **log_env)
    done = await open_stream(first.url, params={"query": f"{marker} completes"}, headers=bearer(alice))
    assert done.frames[-1]["type"] == "done", done.frames[-1]
    cut = await open_stream(
        first.url, params={"query": f"{marker} " + "word " * 200}, headers=bearer(bob), stop_after_tokens=2
    )
    assert cut.status == 200
    cut_end = await good.ended(cut.headers["x-request-id"], timeout=10)
    assert cut_end["outcome"] == "cancelled"
    async with httpx.AsyncClient(base_url=first.url, timeout=30) as client:
        response = await chat(client, f"{marker} chat", bearer(alice))
        assert response.status_code == 200, response.text
        for i in range(3):  # anonymous: the email in the body is a hint, never stored
            response = await chat(client, f"{marker} anon {i}", user_email="anon@example.com")
            assert response.status_code == 200, response.text
        limited = await chat(client, f"{marker} one too many", user_email="anon@example.com")
        assert limited.status_code == 429 and "retry-after" in limited.headers
        refused = await chat(client, f"{marker} bad token", bearer(garbage))
        assert refused.status_code == 401 and refused.json()["error"]["code"]
        read = await client.get(ADMIN_PATH, headers=bearer(admin))
        assert read.status_code == 200, read.text
    live = {p.name: p.read_bytes() for p in db.parent.iterdir() if p.is_file()}  # -wal/-shm exist only now
    assert {"audit.sqlite3", "audit.sqlite3-wal", "audit.sqlite3-shm", "audit.sqlite3.key"} <= set(live), live.keys()
    assert not [name for name, data in live.items() if marker.encode() in data]
    assert await asyncio.to_thread(first.sigterm_and_wait) == 0, first.output()

    # Bridge 2 on the same store: a stub that fails every stream after its first token.
    failing = stub_factory("--mode", "echo", "--fail-after", "1")
    second = start_bridge(failing, db, **log_env)
    failed = await open_stream(second.url, params={"query": f"{marker} fails here"}, headers=bearer(carol))
    assert failed.frames[-1]["type"] == "error", failed.frames
    async with httpx.AsyncClient(base_url=second.url, timeout=30) as client:
        broken_chat = await chat(client, f"{marker} chat fails too", bearer(carol))
        assert broken_chat.status_code >= 500, broken_chat.text
    assert await asyncio.to_thread(second.sigterm_and_wait) == 0, second.output()
    good.stop()
    failing.stop()

    assert_verifies(db)
    export_file = tmp_path / "export.jsonl"
    with export_file.open("w") as out:
        assert cli(db, "export", stdout=out).returncode == 0
    records = [json.loads(line) for line in export_file.read_text().splitlines()]
    types = Counter(r["event_type"] for r in records)
    expected = set(ALLOWED_FIELDS) - {"retention_checkpoint"}  # only a purge writes one
    assert set(types) == expected, types
    assert types["stream_started"] == 3 and sum(types[t] for t in END_TYPES) == 3
    assert types["chat"] == 5 and types["rate_limited"] == 1 and types["auth_failed"] == 1
    chat_outcomes = {(r["user_id"], r["outcome"], r["error_code"]) for r in records if r["event_type"] == "chat"}
    assert ("carol", "error", broken_chat.json()["error"]["code"]) in chat_outcomes, chat_outcomes

    keys = load_keys(db, create=False)
    for record in records:
        kind, fields = record["event_type"], fields_of(record)
        assert fields - OPTIONAL_FIELDS == ALLOWED_FIELDS[kind], record
        user = record["user_id"]
        if user in emails:  # a verified caller: its verified email, and only that
            assert record.get("email") == emails[user], record
        else:
            assert user.startswith("anon:") and "email" not in record, record
        serialized = json.dumps(record)
        if kind in {"rate_limited", "auth_failed"}:
            assert record["client_ip"] == "127.0.0.1" and record["path"] == CHAT_PATH, record
        else:
            assert "127.0.0.1" not in serialized, record
        assert "anon@example.com" not in serialized
        if "query_hmac" in record:  # keyed: reproducible with the store's key, not with plain SHA-256
            assert record["query_hmac"] not in {hashlib.sha256(q.encode()).hexdigest() for q in (marker,)}
            assert len(record["query_hmac"]) == 64

    by_request = {r["request_id"]: r for r in records if r["event_type"] in END_TYPES}
    assert by_request[done.headers["x-request-id"]]["event_type"] == "stream_completed"
    assert by_request[done.headers["x-request-id"]]["query_hmac"] == keys.query_hmac(f"{marker} completes")
    assert by_request[cut.headers["x-request-id"]]["event_type"] == "stream_cancelled"
    failed_record = by_request[failed.headers["x-request-id"]]
    assert failed_record["event_type"] == "stream_failed" and failed_record["error_code"]
    auth = next(r for r in records if r["event_type"] == "auth_failed")
    assert "email" not in auth and auth["user_id"].startswith("anon:")
    assert next(r for r in records if r["event_type"] == "admin_read")["email"] == "ops@example.com"

    # The raw query and the tokens: in no file under tmp_path and in no process output.
    needles = {
        "the query marker": marker,
        **{f"token {i}": t for i, t in enumerate((alice, bob, carol, admin, garbage))},
    }
    outputs = {
        "bridge 1 output": first.all_output(),
        "bridge 2 output": second.all_output(),
        "stub output": "\n".join(good.lines + good.stderr_lines + failing.lines + failing.stderr_lines),
    }
    assert_absent(needles, tmp_path, outputs)


def assert_absent(needles: Mapping[str, str], directory: Path, outputs: Mapping[str, str]) -> None:
    produced = sorted(p for p in directory.rglob("*") if p.is_file())
    names = {p.name for p in produced}
    assert {"audit.sqlite3", "audit.sqlite3.key", "combined.log", "export.jsonl"} <= names, names
    assert (directory / "logs" / "combined.log").stat().st_size > 0  # DEBUG logging really wrote something
    for what, needle in needles.items():
        for path in produced:
            assert needle.encode() not in path.read_bytes(), f"{what} found in {path}"
        for source, text in outputs.items():
            assert needle not in text, f"{what} found in {source}"


# -- SIGTERM with 200 streams in flight ------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-workers"])
async def test_sigterm_during_200_streams_loses_no_audit_record(
    stub_factory: StubFactory, start_bridge: BridgeStarter, tmp_path: Path, request: pytest.FixtureRequest, workers: int
) -> None:
    """Two workers write one chain: every record of both is there, and the chain verifies."""
    n = 200
    db = tmp_path / "audit.sqlite3"
    stub = stub_factory("--mode", "echo", "--token-delay-ms", "100", "--repeat", "100")
    env = workers_env(request, workers, MAX_STREAMS_PER_USER="1000", MAX_STREAMS_TOTAL="1000", SHUTDOWN_GRACE_S="0.5")
    bridge = start_bridge(stub, db, RATE_LIMIT=UNLIMITED, **env)
    mid_flight = 0
    all_mid_flight = asyncio.Event()
    request_ids: list[str] = []
    last_frames: list[dict[str, Any]] = []

    async def one(client: httpx.AsyncClient, i: int) -> None:
        nonlocal mid_flight
        async with client.stream("GET", STREAM_PATH, params={"query": f"stream {i} a b c"}) as response:
            assert response.status_code == 200
            request_ids.append(response.headers["x-request-id"])
            parser, counted, last = Parser(), False, None
            async for chunk in response.aiter_raw():
                for event in parser.feed(chunk):
                    if event.type != "message":
                        continue
                    last = json.loads(event.data)
                    if last["type"] == "token" and not counted:
                        counted, mid_flight = True, mid_flight + 1
                        if mid_flight == n:
                            all_mid_flight.set()
            assert last is not None
            last_frames.append(last)

    limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=bridge.url, timeout=60, limits=limits) as client:
        tasks = [asyncio.create_task(one(client, i)) for i in range(n)]
        waiter = asyncio.create_task(all_mid_flight.wait())
        await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED, timeout=60)
        assert all_mid_flight.is_set(), [t.exception() for t in tasks if t.done()][:3]
        exit_code = asyncio.create_task(asyncio.to_thread(bridge.sigterm_and_wait))
        await asyncio.gather(*tasks)
        assert await exit_code == 0, bridge.output()

    assert len(last_frames) == n and all(f["type"] in {"done", "error"} for f in last_frames)
    records = export(db)
    started = Counter(r["request_id"] for r in records if r["event_type"] == "stream_started")
    ended = Counter(r["request_id"] for r in records if r["event_type"] in END_TYPES)
    assert len(started) == n and set(started.values()) == {1}
    assert started == ended, (len(ended), set(started) - set(ended))
    assert set(started) == set(request_ids)
    outcomes = Counter(r["event_type"] for r in records if r["event_type"] in END_TYPES)
    # Streams 100 s long, SHUTDOWN_GRACE_S=0.5: the drain ends every one with SHUTTING_DOWN.
    assert outcomes == {"stream_failed": n}, outcomes
    assert {r["error_code"] for r in records if r["event_type"] == "stream_failed"} == {"SHUTTING_DOWN"}
    assert {f.get("code") for f in last_frames} == {"SHUTTING_DOWN"}
    assert "AUDIT EVENTS DROPPED" not in bridge.all_output()
    assert_verifies(db)


# -- the admin endpoint over HTTP ------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-workers"])
async def test_admin_endpoint_access_filters_pagination_and_reads_are_audited(
    stub_factory: StubFactory, start_bridge: BridgeStarter, tmp_path: Path, request: pytest.FixtureRequest, workers: int
) -> None:
    """With two workers, any worker's admin read sees the records every worker wrote."""
    db = tmp_path / "audit.sqlite3"
    stub = stub_factory("--mode", "echo")
    bridge = start_bridge(stub, db, JWT_SECRET=JWT_SECRET, RATE_LIMIT=UNLIMITED, **workers_env(request, workers))
    admin = bearer(token("root", role="admin", email="ops@example.com"))
    member = bearer(token("m1", email="m1@example.com"))
    async with httpx.AsyncClient(base_url=bridge.url, timeout=30) as client:
        for i in range(4):
            assert (await chat(client, f"member question {i}", member)).status_code == 200
        for i in range(3):
            assert (await chat(client, f"anonymous question {i}")).status_code == 200

        anonymous = await client.get(ADMIN_PATH)
        assert anonymous.status_code == 401, anonymous.text  # not signed in: authenticate, then retry
        assert anonymous.headers["content-type"].startswith("application/json")
        assert anonymous.json()["error"]["code"] == "UNAUTHORIZED"
        assert anonymous.headers["www-authenticate"].startswith("Bearer")
        forbidden = await client.get(ADMIN_PATH, headers=member)
        assert forbidden.status_code == 403 and forbidden.json()["error"]["code"] == "FORBIDDEN"
        assert "www-authenticate" not in forbidden.headers

        # The 7 chats are queued to the writer asynchronously: read until all are visible.
        async def read(**params: str) -> dict[str, Any]:
            response = await client.get(ADMIN_PATH, params=params, headers=admin)
            assert response.status_code == 200, response.text
            assert response.headers["content-type"].startswith("application/json")
            body: dict[str, Any] = response.json()
            return body

        reads = 0
        while True:
            everything = await read(event_type="chat", verify="1")
            reads += 1
            if everything["count"] == 7:
                break
            assert reads < 200, everything
        assert everything["chain"]["ok"] is True and everything["chain"]["checked"] >= 7
        chats = everything["records"]
        assert [r["id"] for r in chats] == sorted((r["id"] for r in chats), reverse=True)  # newest first

        # The refusals were queued after the chats and may land in the writer's next batch.
        while True:
            mine = await read(user_id="m1")
            reads += 1
            if mine["count"] >= 5:
                break
            assert reads < 400, mine
        assert {r["user_id"] for r in mine["records"]} == {"m1"}
        assert Counter(r["event_type"] for r in mine["records"]) == {"chat": 4, "auth_failed": 1}
        assert all(r["email"] == "m1@example.com" for r in mine["records"])
        mine = await read(user_id="m1", event_type="auth_failed")
        reads += 1
        assert [(r["reason"], r["client_ip"]) for r in mine["records"]] == [("FORBIDDEN", "127.0.0.1")]

        oldest_ts = min(r["ts"] for r in chats)
        newest_ts = max(r["ts"] for r in chats)
        window = await read(event_type="chat", since=oldest_ts, until=newest_ts)
        reads += 1
        assert window["count"] == 6  # until is exclusive, since inclusive
        assert all(oldest_ts <= r["ts"] < newest_ts for r in window["records"])
        late = await read(event_type="chat", since=newest_ts)
        reads += 1
        assert [r["ts"] for r in late["records"]] == [newest_ts]

        pages: list[list[int]] = []
        cursor: int | None = None
        while True:
            params = {"event_type": "chat", "limit": "3"} | ({"cursor": str(cursor)} if cursor else {})
            page = await read(**params)
            reads += 1
            pages.append([r["id"] for r in page["records"]])
            cursor = page["next_cursor"]
            if cursor is None:
                break
            assert cursor == pages[-1][-1]
        assert [len(p) for p in pages] in ([3, 3, 1], [3, 3, 1, 0])
        assert [i for p in pages for i in p] == [r["id"] for r in chats]

        bad = await client.get(ADMIN_PATH, params={"event_type": "nope"}, headers=admin)
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "INVALID_REQUEST"

    assert await asyncio.to_thread(bridge.sigterm_and_wait) == 0
    records = export(db)
    admin_reads = [r for r in records if r["event_type"] == "admin_read"]
    assert len(admin_reads) == reads, (len(admin_reads), reads)
    assert {r["user_id"] for r in admin_reads} == {"root"}
    assert all(r["email"] == "ops@example.com" for r in admin_reads)
    assert {"event_type": "chat", "limit": "3", "offset": "0"} in [r["filters"] for r in admin_reads]
    refused = [r for r in records if r["event_type"] == "auth_failed"]
    assert sorted(r["reason"] for r in refused) == ["FORBIDDEN", "UNAUTHORIZED"]
    assert all(r["path"] == ADMIN_PATH and r["client_ip"] == "127.0.0.1" for r in refused)
    assert_verifies(db)


# -- backup and purge while the bridge writes ------------------------------------------------------


class Traffic:
    """Keeps a bridge writing audit records (paced streams plus chats) until ``stop``."""

    def __init__(self, bridge: AuditBridge) -> None:
        self.bridge = bridge
        self.done = 0
        self._changed = asyncio.Condition()
        self._stop = asyncio.Event()
        self._client = httpx.AsyncClient(base_url=bridge.url, timeout=30)
        self._workers = [asyncio.create_task(self._streams()) for _ in range(10)]
        self._workers += [asyncio.create_task(self._chats()) for _ in range(2)]

    async def _count(self) -> None:
        async with self._changed:
            self.done += 1
            self._changed.notify_all()

    async def _streams(self) -> None:
        while not self._stop.is_set():
            reply = await open_stream(self.bridge.url, params={"query": "a b c d e f g h"})
            assert reply.frames[-1]["type"] == "done", reply.frames[-1:]
            await self._count()

    async def _chats(self) -> None:
        while not self._stop.is_set():
            assert (await chat(self._client, "keep writing")).status_code == 200
            await self._count()

    async def reach(self, count: int, timeout: float = 30) -> None:
        """Wait until ``count`` requests have completed in total (a worker's failure is raised)."""

        async def reached() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: self.done >= count)

        waiter = asyncio.create_task(reached())
        await asyncio.wait([waiter, *self._workers], return_when=asyncio.FIRST_COMPLETED, timeout=timeout)
        for worker in self._workers:
            if worker.done():
                worker.result()
        assert waiter.done(), (self.done, count)

    async def stop(self) -> None:
        self._stop.set()
        try:
            await asyncio.gather(*self._workers)
        finally:
            await self._client.aclose()


@pytest.fixture(params=[1, 2], ids=["one-process", "two-workers"])
async def traffic(
    stub_factory: StubFactory, start_bridge: BridgeStarter, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Traffic]:
    """Streams written into the store all along; with two workers, both write the one chain."""
    stub = stub_factory("--mode", "echo", "--token-delay-ms", "20")
    env = workers_env(request, request.param, MAX_STREAMS_PER_USER="100")
    bridge = start_bridge(stub, tmp_path / "audit.sqlite3", RATE_LIMIT=UNLIMITED, **env)
    running = Traffic(bridge)
    await running.reach(20)
    yield running
    if not running._stop.is_set():
        running._stop.set()
        await asyncio.gather(*running._workers, return_exceptions=True)
        await running._client.aclose()


async def test_backup_while_writing_verifies(traffic: Traffic, tmp_path: Path) -> None:
    db = tmp_path / "audit.sqlite3"
    copy = tmp_path / "backups" / "audit-copy.sqlite3"
    before = traffic.done
    code, out, err = await acli(db, "backup", str(copy))
    assert code == 0, (out, err)
    assert "audit chain OK" in out
    await traffic.reach(before + 1)  # the bridge kept serving and writing around the backup
    assert key_path(copy).is_file() and key_path(copy).stat().st_mode & 0o777 == 0o600
    assert copy.stat().st_mode & 0o777 == 0o600
    code, out, _ = await acli(db, "backup", str(copy))  # never overwrites an existing backup
    assert code == 2 and "refusing" in out
    await traffic.stop()
    assert len(export(copy)) >= 20
    assert await asyncio.to_thread(traffic.bridge.sigterm_and_wait) == 0
    assert_verifies(db)
    assert_verifies(copy)


async def test_purge_while_writing_keeps_the_chain_verifiable(traffic: Traffic, tmp_path: Path) -> None:
    db = tmp_path / "audit.sqlite3"
    code, out, err = await acli(db, "purge", "--older-than-days", "30")
    assert code == 0 and out.startswith("purged 0 "), (out, err)
    code, out, err = await acli(db, "purge", "--older-than-days", "0")  # everything written until now
    assert code == 0, (out, err)
    purged = int(out.split()[1])
    assert purged > 0
    code, out, err = await acli(db, "verify")  # while the bridge keeps writing
    assert code == 0, (out, err)
    await traffic.reach(traffic.done + 20)  # records chained on top of the checkpoint
    await traffic.stop()
    assert await asyncio.to_thread(traffic.bridge.sigterm_and_wait) == 0
    records = export(db)
    checkpoints = [r for r in records if r["event_type"] == "retention_checkpoint"]
    assert len(checkpoints) == 1 and checkpoints[0]["purged_count"] == purged
    assert fields_of(checkpoints[0]) == ALLOWED_FIELDS["retention_checkpoint"]
    # The purged prefix is gone: what remains starts right after it. Records the bridge committed
    # between the purge's plan and its write (ts past the cutoff, or flushed late) stay, before the
    # checkpoint, so the first record is not necessarily the checkpoint itself.
    assert checkpoints[0]["last_purged_id"] == purged
    assert records[0]["id"] == purged + 1
    assert all(r["id"] > purged for r in records)
    assert len(records) > 20 and records[-1]["id"] > checkpoints[0]["id"]
    assert_verifies(db)


# -- export into a closed pipe ---------------------------------------------------------------------


async def test_export_into_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    db = tmp_path / "audit.sqlite3"
    trail = AuditTrail.from_settings(Settings(audit_db=str(db)))
    await trail.start()
    for i in range(3000):  # far more than a pipe buffer holds
        assert trail.record(trail.events.stream("stream_started", Identity(client_ip="192.0.2.1"), f"r{i}", None, "q"))
    await trail.aclose()
    err = tmp_path / "stderr.txt"
    for reader in ("head -1", "head -c 10", "true"):
        script = f"set -o pipefail; {sys.executable} -m bridge audit export 2>{err} | {reader}"
        result = await asyncio.to_thread(
            subprocess.run,
            ["bash", "-c", script],
            env=base_env({"AUDIT_DB": str(db)}),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert err.read_text() == "", (reader, err.read_text())
        # 141 = 128 + SIGPIPE, what `yes | head -1` reports: quiet, yet not mistaken for a full export
        assert result.returncode == 141, (reader, result.returncode)
        if reader == "head -1":
            assert json.loads(result.stdout)["id"] == 1
    assert len(export(db)) == 3000  # and a reader that takes everything still gets everything
