"""``--workers 2``: two processes on one port, and everything a client sees stays exact.

Real processes throughout: the supervisor and its two workers, one redis-server, the stub. Each
request below opens a fresh connection, so the kernel spreads them over both workers (SO_REUSEPORT
hashes the client's port); a budget kept per worker would show within a handful of requests.
The resume, stop, drain and audit tests of the multi-instance suite run against a two-worker
bridge too (tests/e2e/test_resume_redis.py, tests/e2e/test_stop_signals.py, tests/e2e/test_audit.py).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import BridgeFactory, StubFactory
from tests.support.processes import ROOT, base_env
from tests.support.redis import redis_factory, redis_server  # noqa: F401  (fixtures)
from tests.support.sse_client import STREAM_PATH, StreamReply, open_stream
from tests.support.workers import connections_held, two_workers, wait_for_workers, worker_pids, worker_place

pytestmark = pytest.mark.redis


def fresh_get(url: str, path: str, **kwargs: object) -> httpx.Response:
    """One request on a connection of its own (so consecutive requests may reach either worker)."""
    with httpx.Client(base_url=url, timeout=30) as client:
        return client.get(path, **kwargs)  # type: ignore[arg-type]


def refusal_line(env: dict[str, str], *args: str) -> str:
    """The one stderr line of a bridge that refuses to start with exit 2."""
    done = subprocess.run(
        [sys.executable, "-m", "bridge", *args, "--port", "0"],
        env=base_env(env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_two_workers_without_redis_are_refused_with_one_line(tmp_path: Path) -> None:
    """Per-worker limits would silently multiply every budget: refused, naming what to set."""
    line = refusal_line({"AUDIT_DB": str(tmp_path / "audit.sqlite3"), "RESUME_GRACE_S": "5"}, "--workers", "2")
    assert "WORKERS=2 needs state shared by all workers" in line
    assert "RATE_LIMIT_STORAGE and RESUME_STORE" in line
    assert not (tmp_path / "audit.sqlite3").exists(), "nothing is created before the refusal"


def test_a_tmpdir_too_long_for_the_workers_sockets_is_refused_with_one_line(tmp_path: Path) -> None:
    """A Unix socket's path has at most 107 bytes: with a longer TMPDIR every worker used to fail
    at its start (a traceback each) and the bridge exited 1. Now one line and exit 2, as for any
    other setting it cannot run with, and nothing is left in TMPDIR."""
    long_tmp = tmp_path / ("d" * 100)
    long_tmp.mkdir()
    env = {"AUDIT_DB": str(tmp_path / "audit.sqlite3"), "TMPDIR": str(long_tmp)}
    line = refusal_line({**env, **two_workers("redis://127.0.0.1:1/0")})  # nothing connects before the refusal
    assert line.startswith("bali-zero-bridge: invalid configuration: TMPDIR ") and "too long" in line
    assert not list(long_tmp.iterdir())


async def test_client_spreading_requests_over_workers_gets_one_rate_limit(
    stub_factory: StubFactory,
    bridge_factory: BridgeFactory,
    redis_server: str,  # noqa: F811
) -> None:
    stub = stub_factory("--mode", "echo")
    bridge = bridge_factory(stub, **two_workers(redis_server, RATE_LIMIT="3/minute"))
    answers = [await asyncio.to_thread(fresh_get, bridge.url, STREAM_PATH, params={"query": "q"}) for _ in range(8)]
    assert [r.status_code for r in answers] == [200] * 3 + [429] * 5, "3/minute, whichever worker answers"
    assert all(0 < int(r.headers["retry-after"]) <= 60 for r in answers[3:])


async def test_user_spreading_streams_over_workers_gets_one_stream_cap(
    stub_factory: StubFactory,
    bridge_factory: BridgeFactory,
    redis_server: str,  # noqa: F811
) -> None:
    stub = stub_factory("--mode", "echo", "--token-delay-ms", "200", "--repeat", "100")
    bridge = bridge_factory(stub, **two_workers(redis_server, MAX_STREAMS_PER_USER="2", TRUSTED_PROXIES="127.0.0.1/32"))
    held = [
        asyncio.create_task(open_stream(bridge.url, params={"query": f"held {i}"}, headers={"x-user-id": "alice"}))
        for i in range(2)
    ]
    try:
        await open_streams_reach(bridge.url, 2)
        refused = [
            await asyncio.to_thread(
                fresh_get, bridge.url, STREAM_PATH, params={"query": "more"}, headers={"x-user-id": "alice"}
            )
            for _ in range(6)
        ]
        assert [r.status_code for r in refused] == [429] * 6
        assert {r.json()["error"]["code"] for r in refused} == {"TOO_MANY_STREAMS"}
        other = await open_stream(bridge.url, params={"query": "a b"}, headers={"x-user-id": "bob"})
        assert other.frames[-1]["type"] == "done", "another identity has its own budget"
    finally:
        for task in held:
            task.cancel()
        await asyncio.gather(*held, return_exceptions=True)


def _stats(url: str) -> dict[str, object]:
    return dict(fresh_get(url, "/api/v2/bali-zero/stream-stats").json())


async def stats_reach(url: str, field: str, value: object, timeout: float = 30) -> None:
    """Poll the stats endpoint (the whole server's figures) until its ``field`` is ``value``."""
    deadline = time.monotonic() + timeout
    while (await asyncio.to_thread(_stats, url))[field] != value:
        assert time.monotonic() < deadline, f"the stats never showed {field} = {value}"
        await asyncio.sleep(0.05)  # polling: the stats endpoint has no event to await


async def open_streams_reach(url: str, count: int) -> None:
    await stats_reach(url, "open_streams", count)


async def every_worker_reports(url: str) -> None:
    """Until both workers answer the stats (a replacement serves)."""
    await stats_reach(url, "workers", {"count": 2, "reporting": 2})


async def test_stats_and_metrics_cover_every_worker(
    stub_factory: StubFactory,
    bridge_factory: BridgeFactory,
    redis_server: str,  # noqa: F811
) -> None:
    stub = stub_factory("--mode", "echo", "--echo-delimiter", ",")
    bridge = bridge_factory(stub, **two_workers(redis_server, RATE_LIMIT="1000/minute", MAX_STREAMS_PER_USER="100"))
    n = 12
    replies = await asyncio.gather(*(open_stream(bridge.url, params={"query": "a,b,c"}) for _ in range(n)))
    assert all(r.frames[-1]["type"] == "done" for r in replies)
    for _ in range(4):  # whichever worker answers, it answers for both
        stats = _stats(bridge.url)
        assert stats["workers"] == {"count": 2, "reporting": 2}
        assert stats["streams_opened"] == n
        assert stats["outcomes"] == {"completed": n, "cancelled": 0, "error": 0}
        assert stats["first_token_ms"]["count"] == n  # type: ignore[index]
        scrape = fresh_get(bridge.url, "/metrics").text.splitlines()
        assert 'bridge_streams_total{error_code="",outcome="completed"} 12.0' in scrape
        assert "bridge_tokens_total 36.0" in scrape
        assert "bridge_first_token_seconds_count 12.0" in scrape
        assert "bridge_inter_token_seconds_count 24.0" in scrape


async def test_a_killed_worker_is_replaced_and_the_server_keeps_answering(
    stub_factory: StubFactory,
    bridge_factory: BridgeFactory,
    redis_server: str,  # noqa: F811
) -> None:
    stub = stub_factory("--mode", "echo")
    bridge = bridge_factory(stub, **two_workers(redis_server, RATE_LIMIT="1000/minute"))
    before = worker_pids(bridge)
    assert len(before) == 2
    os.kill(before[0], signal.SIGKILL)
    after = await asyncio.to_thread(wait_for_workers, bridge, 2, {before[0]})
    assert before[1] in after
    answers = [await asyncio.to_thread(fresh_get, bridge.url, "/readyz") for _ in range(8)]
    assert [r.status_code for r in answers] == [200] * 8
    assert bridge.proc.poll() is None
    assert any("worker 0" in line and "exited with status -9" in line for line in bridge.stderr_lines)


async def test_a_worker_stopped_alone_ends_its_streams_with_a_retryable_frame(
    stub_factory: StubFactory,
    bridge_factory: BridgeFactory,
    redis_server: str,  # noqa: F811
) -> None:
    """SIGTERM to one worker drains that worker only; its supervisor starts another in its place."""
    stub = stub_factory("--mode", "echo", "--token-delay-ms", "100", "--repeat", "300")
    bridge = bridge_factory(
        stub,
        **two_workers(redis_server, RATE_LIMIT="1000/minute", SHUTDOWN_GRACE_S="0.5", TRUSTED_PROXIES="127.0.0.1/32"),
    )
    # The kernel spreads connections over the workers by a hash: open streams until each worker
    # holds some, so that stopping one ends some streams and leaves others.
    port = int(bridge.url.rsplit(":", 1)[1])
    streams: list[asyncio.Task[StreamReply]] = []
    while True:
        i = len(streams)
        streams.append(
            asyncio.create_task(open_stream(bridge.url, params={"query": f"s{i}"}, headers={"x-user-id": f"u{i}"}))
        )
        await open_streams_reach(bridge.url, len(streams))
        held = {pid: connections_held(pid, port) for pid in worker_pids(bridge)}
        if all(held.values()):
            break
        assert len(streams) < 24, held
    victim = worker_pids(bridge)[0]
    os.kill(victim, signal.SIGTERM)
    ended: set[asyncio.Task[StreamReply]] = set()
    running = set(streams)
    while len(ended) < held[victim]:
        finished, running = await asyncio.wait(running, timeout=15, return_when=asyncio.FIRST_COMPLETED)
        assert finished, f"{held[victim] - len(ended)} streams of the stopped worker did not end"
        ended |= finished
    for task in ended:
        last = task.result().frames[-1]
        assert last["type"] == "error" and last["code"] == "SHUTTING_DOWN" and last["retryable"] is True
    await asyncio.to_thread(wait_for_workers, bridge, 2, {victim})
    assert len(ended) == held[victim] and running, "the other worker's streams go on"
    for task in streams:
        task.cancel()
    await asyncio.gather(*streams, return_exceptions=True)
    assert bridge.proc.poll() is None


async def test_workers_of_a_killed_supervisor_drain_and_exit(
    stub_factory: StubFactory,
    bridge_factory: BridgeFactory,
    redis_server: str,  # noqa: F811
) -> None:
    """Nobody would stop them otherwise: each sees its control socket close and drains."""
    stub = stub_factory("--mode", "echo")
    bridge = bridge_factory(stub, **two_workers(redis_server))
    workers = [psutil.Process(pid) for pid in worker_pids(bridge)]
    bridge.kill()
    _, alive = await asyncio.to_thread(psutil.wait_procs, workers, 30)
    assert not alive, "the workers outlived their supervisor"


async def test_the_rollout_gives_a_user_the_same_answer_on_every_worker(
    stub_factory: StubFactory,
    bridge_factory: BridgeFactory,
    redis_server: str,  # noqa: F811
) -> None:
    stub = stub_factory("--mode", "echo")
    bridge = bridge_factory(
        stub,
        **two_workers(redis_server, SSE_ROLLOUT_PERCENT="50", TRUSTED_PROXIES="127.0.0.1/32", RATE_LIMIT="1000/minute"),
    )
    answers: dict[str, set[int]] = {}
    for user in range(12):
        for _ in range(3):  # fresh connections: the kernel picks the worker
            reply = await asyncio.to_thread(
                fresh_get, bridge.url, STREAM_PATH, params={"query": "q"}, headers={"x-user-id": f"user-{user}"}
            )
            answers.setdefault(f"user-{user}", set()).add(reply.status_code)
    assert all(len(codes) == 1 for codes in answers.values()), answers
    assert {code for codes in answers.values() for code in codes} == {200, 404}, "50 %: some in, some out"


def test_sigterm_while_the_workers_start_stops_the_supervisor_with_0(
    tmp_path: Path,
    redis_server: str,  # noqa: F811
) -> None:
    """A stop before every worker is ready ends the start: the supervisor used to wait for the
    workers' readiness alone and, stopped meanwhile, exited 1 or never."""
    env = base_env({"AUDIT_DB": str(tmp_path / "audit.sqlite3"), **two_workers(redis_server)})
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge", "--port", "0"],
        env=env,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        supervisor = psutil.Process(proc.pid)
        deadline = time.monotonic() + 30
        while len(supervisor.children()) < 2:  # both workers started, neither serving yet
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr
            time.sleep(0.01)  # polling a process table: there is no event to await
        workers = supervisor.children()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-2000:]
    assert "listening on" not in out
    _, alive = psutil.wait_procs(workers, 10)
    assert not alive


async def test_a_worker_that_cannot_start_strands_no_client_connection(
    stub_factory: StubFactory,
    bridge_factory: BridgeFactory,
    redis_server: str,  # noqa: F811
) -> None:
    """While a slot's worker keeps failing to start, its socket takes no connection.

    Its socket used to stay listening: the kernel gave it half of every new connection, and those
    waited in its queue for as long as the slot could not start (here: until its peer socket's
    name is freed; a worker that can never start, for ever).
    """
    stub = stub_factory("--mode", "echo")
    bridge = bridge_factory(stub, **two_workers(redis_server, RATE_LIMIT="1000/minute"))
    victim = worker_pids(bridge)[0]
    slot, runtime = worker_place(victim)
    blocker = runtime / "peers" / f"{slot}.sock"
    blocker.unlink()
    blocker.mkdir()  # its replacements cannot bind their peer socket: each exits before serving
    os.kill(victim, signal.SIGKILL)
    await asyncio.to_thread(
        bridge.wait_for_line, lambda line: f"worker {slot} " in line and "it never served" in line, 30, stderr=True
    )

    def healthz() -> int:
        return fresh_get(bridge.url, "/healthz", timeout=3).status_code  # far above a served answer

    answers = [await asyncio.to_thread(healthz) for _ in range(12)]
    assert answers == [200] * 12, "every connection reached the worker that serves"
    blocker.rmdir()
    await every_worker_reports(bridge.url)  # the slot is served again, on a fresh socket
    assert [await asyncio.to_thread(healthz) for _ in range(8)] == [200] * 8


async def test_workers_replaced_again_and_again_leave_no_metric_files_behind(
    stub_factory: StubFactory,
    bridge_factory: BridgeFactory,
    redis_server: str,  # noqa: F811
) -> None:
    """A replacement takes over its slot's metric files, so its counts go on and the directory
    (which every scrape reads whole) stays one set of files per slot. Named after the pid, every
    replaced worker left two files behind: a worker crash-looping for hours slowed every scrape."""
    stub = stub_factory("--mode", "echo")
    bridge = bridge_factory(stub, **two_workers(redis_server, RATE_LIMIT="1000/minute"))
    replies = await asyncio.gather(*(open_stream(bridge.url, params={"query": "a b"}) for _ in range(2)))
    assert all(r.frames[-1]["type"] == "done" for r in replies)
    metrics_dir = worker_place(worker_pids(bridge)[0])[1] / "metrics"
    files = sorted(path.name for path in metrics_dir.iterdir())
    for _ in range(3):
        victim = worker_pids(bridge)[0]
        os.kill(victim, signal.SIGKILL)
        await asyncio.to_thread(wait_for_workers, bridge, 2, {victim})
        await every_worker_reports(bridge.url)
    assert sorted(path.name for path in metrics_dir.iterdir()) == files
    scrape = fresh_get(bridge.url, "/metrics").text.splitlines()
    assert 'bridge_streams_total{error_code="",outcome="completed"} 2.0' in scrape, "the killed workers' counts stay"
    assert "bridge_open_streams 0.0" in scrape


async def test_a_supervisor_out_of_descriptors_leaves_no_slot_empty_for_good(
    stub_factory: StubFactory,
    bridge_factory: BridgeFactory,
    redis_server: str,  # noqa: F811
) -> None:
    """Starting a worker can fail in the supervisor itself (no descriptor for its control socket
    here, or no fork): the start is retried with the backoff, and meanwhile the slot takes no
    connection. The failure used to end the task that was to replace the worker: the slot stayed
    empty for good, its socket still listening, and half of the new connections waited on it."""
    stub = stub_factory("--mode", "echo")
    bridge = bridge_factory(stub, **two_workers(redis_server, RATE_LIMIT="1000/minute"))
    supervisor = psutil.Process(bridge.proc.pid)
    soft, hard = supervisor.rlimit(psutil.RLIMIT_NOFILE)
    highest = max(int(fd) for fd in os.listdir(f"/proc/{supervisor.pid}/fd"))
    supervisor.rlimit(psutil.RLIMIT_NOFILE, (highest + 1, hard))  # no new descriptor above those it holds
    victim = worker_pids(bridge)[0]
    os.kill(victim, signal.SIGKILL)
    await asyncio.to_thread(bridge.wait_for_line, lambda line: "could not be started" in line, 30, stderr=True)

    def healthz() -> int:
        return fresh_get(bridge.url, "/healthz", timeout=3).status_code

    assert [await asyncio.to_thread(healthz) for _ in range(12)] == [200] * 12
    supervisor.rlimit(psutil.RLIMIT_NOFILE, (soft, hard))
    await every_worker_reports(bridge.url)
