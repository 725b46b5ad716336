"""The pure pieces of ``--workers`` (settings, stats merging, peer answers, the private directory)
and the shared stream caps against a real redis-server, in process."""

from __future__ import annotations

import asyncio
import os
import random
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest

from bridge.config import ConfigError, Settings, parse_workers, usable_cpus
from bridge.errors import ServiceUnavailable, TooManyRequests
from bridge.sharedcaps import SharedStreamCaps, caps_for, user_key
from bridge.stats import StreamStats, merge_snapshots
from bridge.streamcap import StreamCaps
from bridge.types import StreamResult
from bridge.workers.peers import _well_formed, socket_path
from bridge.workers.supervisor import MAX_UNIX_PATH_BYTES, _runtime_dir
from tests.support.redis import RedisFactory, redis_factory, redis_server  # noqa: F401  (fixtures)


def test_workers_setting_takes_a_number_or_auto() -> None:
    assert Settings.from_env({}).workers == 1
    assert parse_workers("auto") == usable_cpus() >= 1
    assert Settings.from_env({"WORKERS": "auto", "RATE_LIMIT_STORAGE": "redis://r:6379/0"}).workers == usable_cpus()
    with pytest.raises(ConfigError, match=r"WORKERS must be within 1\.\.64"):
        Settings.from_env({"WORKERS": "0"})
    with pytest.raises(ConfigError, match="WORKERS='two'"):
        Settings.from_env({"WORKERS": "two"})


@pytest.mark.parametrize(
    ("env", "missing"),
    [
        ({}, "set RATE_LIMIT_STORAGE to redis://HOST:PORT/DB, or run one worker"),
        ({"RESUME_GRACE_S": "5"}, "set RATE_LIMIT_STORAGE and RESUME_STORE to redis://HOST:PORT/DB (one Redis"),
        ({"RATE_LIMIT_STORAGE": "redis://r:6379/0", "RESUME_GRACE_S": "5"}, "set RESUME_STORE to redis://"),
    ],
)
def test_several_workers_without_shared_state_are_refused(env: dict[str, str], missing: str) -> None:
    with pytest.raises(ConfigError, match="WORKERS=2 needs state shared by all workers") as info:
        Settings.from_env({"WORKERS": "2", **env})
    assert missing in str(info.value)


def test_several_workers_with_redis_are_accepted() -> None:
    shared = {"RATE_LIMIT_STORAGE": "redis://r:6379/0", "RESUME_STORE": "redis://r:6379/1"}
    assert Settings.from_env({"WORKERS": "4", "RESUME_GRACE_S": "5", **shared}).workers == 4
    assert Settings.from_env({"WORKERS": "2", "RATE_LIMIT_STORAGE": "redis://r:6379/0"}).workers == 2


def _fed(stats: StreamStats, firsts: list[float], gaps: list[float], outcomes: list[str]) -> None:
    for first in firsts:
        stats.stream_opened()
        stats.first_token(first)
    stats.token_gaps(gaps)
    for outcome in outcomes:
        stats.stream_closed(
            StreamResult("s", "r", outcome, 3, 10.0, 1.0, None if outcome != "error" else "X")  # type: ignore[arg-type]
        )


def test_merged_stats_of_two_workers_equal_one_process_fed_everything() -> None:
    """Percentiles over the union of the samples, not an average of each worker's percentiles."""
    rng = random.Random(7)
    firsts = [rng.uniform(0.001, 0.2) for _ in range(300)]
    gaps = [rng.expovariate(40) for _ in range(500)]  # under a bucket's 512 kept samples: exact
    outcomes = ["completed"] * 250 + ["cancelled"] * 30 + ["error"] * 20
    clock = lambda: 1000.0  # noqa: E731  (one fixed instant: the same bucket everywhere)
    whole, a, b = (StreamStats(300, clock=clock) for _ in range(3))
    _fed(whole, firsts, gaps, outcomes)
    _fed(a, firsts[:100], gaps[:350], outcomes[:120])
    _fed(b, firsts[100:], gaps[350:], outcomes[120:])
    merged = merge_snapshots(300, [a.export(), b.export()])
    assert merged == whole.snapshot()
    assert merged["first_token_ms"]["p99"] != pytest.approx(
        (a.snapshot()["first_token_ms"]["p99"] + b.snapshot()["first_token_ms"]["p99"]) / 2
    )


def test_a_peer_answer_of_the_wrong_shape_is_left_out() -> None:
    good = {**StreamStats(60).export(), "sessions_held": 0, "open_connections_by_cap": 0}
    assert _well_formed(good)
    assert not _well_formed({**good, "open_streams": "3"})
    assert not _well_formed({**good, "first_token": [[1, 2]]})
    assert not _well_formed({**good, "inter_token": [[1, 2, ["x"]]]})
    assert not _well_formed({**good, "outcomes": {"completed": 1.5}})
    assert not _well_formed({k: v for k, v in good.items() if k != "reconnections"})


def test_caps_are_in_memory_unless_the_rate_limit_is_on_redis() -> None:
    assert isinstance(caps_for(Settings(), "s"), StreamCaps)
    shared = caps_for(Settings(rate_limit_storage="redis://127.0.0.1:1/0"), "s")
    assert isinstance(shared, SharedStreamCaps)


def test_the_caps_key_holds_no_identity_in_clear() -> None:
    key = user_key("user:alice@example.com")
    assert "alice" not in key and len(key) == len("bzb:caps:user:") + 64


def _caps(url: str, *, server: str = "srv", per_user: int = 2, total: int = 100, **kw: object) -> SharedStreamCaps:
    return SharedStreamCaps(url, per_user, total, server_id=server, fail_open=True, **kw)  # type: ignore[arg-type]


@pytest.mark.redis
async def test_a_user_spreading_streams_over_workers_gets_one_budget(redis_server: str) -> None:  # noqa: F811
    one, two = _caps(redis_server), _caps(redis_server)  # two workers of one server
    first = await one.take("user:alice")
    await two.take("user:alice")
    for caps in (one, two):
        with pytest.raises(TooManyRequests) as info:
            await caps.take("user:alice")
        assert info.value.code == "TOO_MANY_STREAMS"
    await two.take("user:bob")  # another identity: its own budget
    first.release()
    first.release()  # idempotent: frees one slot, not two
    await asyncio.sleep(0.05)  # the release is sent off the caller's path
    await two.take("user:alice")
    with pytest.raises(TooManyRequests):
        await one.take("user:alice")
    await one.aclose()
    await two.aclose()


@pytest.mark.redis
async def test_total_cap_is_per_server_and_shared_by_its_workers(redis_server: str) -> None:  # noqa: F811
    one, two = _caps(redis_server, total=2, per_user=10), _caps(redis_server, total=2, per_user=10)
    other_server = _caps(redis_server, server="other", total=2, per_user=10)
    await one.take("a")
    await two.take("b")
    with pytest.raises(ServiceUnavailable) as info:
        await one.take("c")
    assert info.value.code == "OVERLOADED"
    await other_server.take("c")  # another instance has its own capacity
    for caps in (one, two, other_server):
        await caps.aclose()


@pytest.mark.redis
async def test_a_dead_workers_slots_expire_with_their_lease(redis_server: str) -> None:  # noqa: F811
    dead = _caps(redis_server, per_user=1, lease_ttl_s=1.0)
    await dead.take("user:carol")
    assert dead._refresher is not None
    dead._refresher.cancel()  # the worker is gone: nobody refreshes or releases its lease
    alive = _caps(redis_server, per_user=1, lease_ttl_s=1.0)
    with pytest.raises(TooManyRequests):
        await alive.take("user:carol")
    await asyncio.sleep(1.1)  # the scenario: the lease's TTL passes
    await alive.take("user:carol")
    await alive.aclose()


@pytest.mark.redis
async def test_live_leases_are_refreshed_past_their_ttl(redis_server: str) -> None:  # noqa: F811
    holder = _caps(redis_server, per_user=1, lease_ttl_s=1.0)
    await holder.take("user:dave")
    await asyncio.sleep(1.6)  # the scenario: longer than the TTL, refreshed every third of it
    with pytest.raises(TooManyRequests):
        await _caps(redis_server, per_user=1).take("user:dave")
    await holder.aclose()


@pytest.mark.redis
async def test_redis_down_fails_open_to_worker_caps_or_closed_with_503(redis_factory: RedisFactory) -> None:  # noqa: F811
    server = redis_factory()
    failures: list[BaseException] = []
    open_caps = _caps(server.url, per_user=1, on_storage_error=failures.append, op_timeout_s=0.3)
    closed = SharedStreamCaps(server.url, 1, 10, server_id="s", fail_open=False, op_timeout_s=0.3)
    server.kill()
    lease = await open_caps.take("user:erin")  # counted in this worker's memory meanwhile
    with pytest.raises(TooManyRequests):
        await open_caps.take("user:erin")
    assert failures and open_caps.open_total == 1
    lease.release()
    assert open_caps.open_total == 0
    with pytest.raises(ServiceUnavailable) as info:
        await closed.take("user:erin")
    assert info.value.code == "RATE_LIMIT_UNAVAILABLE" and info.value.retryable
    await open_caps.aclose()
    await closed.aclose()


def test_settings_replace_keeps_the_workers_check() -> None:
    with pytest.raises(ConfigError, match="WORKERS=3 needs state shared"):
        replace(Settings(), workers=3).validate()


def test_the_private_directory_refuses_a_tmpdir_too_long_for_its_sockets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    long_tmp = tmp_path / ("d" * 100)
    long_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(long_tmp))
    with pytest.raises(ConfigError, match=r"TMPDIR .* is too long for the workers' Unix sockets"):
        _runtime_dir(2)
    assert not list(long_tmp.iterdir()), "nothing is left behind"


def test_the_private_directory_in_a_short_tmpdir_fits_every_workers_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    runtime = _runtime_dir(64)
    assert oct(runtime.stat().st_mode & 0o777) == "0o700"
    assert len(os.fsencode(socket_path(runtime / "peers", 63))) <= MAX_UNIX_PATH_BYTES
