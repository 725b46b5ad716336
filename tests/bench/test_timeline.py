"""The first-token timeline's arithmetic and its probes, in process (bench/lab/timeline.py, bench/lab/probes.py)."""

from __future__ import annotations

import asyncio
import sys
import types

from bench.lab import probes
from bench.lab.timeline import summarise, table
from bench.results import Summary


def record(*marks: tuple[str, int, int]) -> dict[str, list[int]]:
    """Marks at (wall µs, hops so far); CPU is half the wall time, process CPU the whole of it."""
    return {name: [us * 1000, us * 500, us * 1000, hops] for name, us, hops in marks}


def test_summarise_gives_medians_per_interval_in_path_order() -> None:
    raw = {
        "probes": {"received": "x", "identity_start": None},
        "abandoned": 1,
        "steps_by_coroutine": {"pump": 6},
        "records": [
            record(("received", 0, 0), ("app_called", 50, 1), ("first_token_written", 1000, 4)),  # warm-up
            record(("received", 0, 0), ("app_called", 70, 1), ("first_token_written", 900, 3)),
            record(("received", 0, 0), ("app_called", 90, 1), ("first_token_written", 1100, 5)),
            record(("received", 0, 0), ("app_called", 80, 2), ("first_token_written", 1000, 4)),
        ],
    }
    result = summarise("bridge", raw, 1, Summary.of([1.5]), (2.0, 1.0, 0.5))
    assert result.requests == 3
    assert [s.phase for s in result.steps] == ["ASGI receive (parse, task start)", "first byte written"]
    receive, write = result.steps
    assert (receive.wall_us, receive.loop_cpu_us, receive.process_cpu_us, receive.hops) == (80, 40, 80, 1)
    assert (write.start, write.end, write.wall_us, write.hops) == ("app_called", "first_token_written", 920, 2)
    assert (result.total.wall_us, result.total.hops) == (1000, 4)
    assert result.unresolved == ["identity_start"]
    assert result.hops_by_coroutine == {"pump": 1.5}  # per recorded request, warm-up included
    assert "| **total** | received → first_token_written | 1000.0 | 500.0 | 1000.0 | 4 |" in table(result)


def test_an_interval_seen_in_under_half_the_requests_is_left_out() -> None:
    rare = record(("received", 0, 0), ("span_start", 10, 0), ("first_token_written", 100, 1))
    common = record(("received", 0, 0), ("first_token_written", 100, 1))
    raw = {"probes": {}, "abandoned": 0, "steps_by_coroutine": {}, "records": [rare, common, common]}
    result = summarise("bridge", raw, 0, Summary(), (0.0, 0.0, 0.0))
    assert [(s.start, s.end) for s in result.steps] == [("received", "first_token_written")]


def test_recorder_keeps_the_first_mark_and_closes_on_the_first_token_written() -> None:
    recorder = probes.Recorder()
    recorder.mark("first_message")  # no request in flight: ignored
    recorder.mark(probes.RECEIVED)
    recorder.mark("first_message")
    first = recorder.current and recorder.current["first_message"]
    recorder.mark("first_message")
    assert recorder.current is not None and recorder.current["first_message"] == first
    recorder.mark(probes.FIRST_TOKEN_WRITTEN)
    assert recorder.current is None and len(recorder.records) == 1
    recorder.mark(probes.RECEIVED)
    recorder.mark(probes.RECEIVED)  # a request that never wrote a token is counted, not kept
    assert recorder.abandoned == 1 and len(recorder.records) == 1


def test_probes_wrap_sync_and_async_functions_at_entry_or_exit() -> None:
    module = types.ModuleType("fake_path")
    calls: list[str] = []

    def build(x: int) -> int:
        calls.append("build")
        return x + 1

    def write(x: int) -> None:
        calls.append("write")

    async def fetch() -> str:
        await asyncio.sleep(0)
        return "message"

    module.build = build  # type: ignore[attr-defined]
    module.fetch = fetch  # type: ignore[attr-defined]
    module.write = write  # type: ignore[attr-defined]
    sys.modules["fake_path"] = module
    try:
        recorder = probes.RECORDER
        recorder.current, recorder.records = None, []
        used = probes.install(
            (
                probes.Probe(probes.RECEIVED, ("fake_path:build",), "entry"),
                probes.Probe("fetched", ("missing_module:fetch", "fake_path:fetch"), "exit"),
                probes.Probe(probes.FIRST_TOKEN_WRITTEN, ("fake_path:write",), "exit", lambda x: x == 2),
                probes.Probe("never", ("fake_path:absent",), "entry"),
            )
        )
        assert used == {
            probes.RECEIVED: "fake_path:build",
            "fetched": "fake_path:fetch",
            probes.FIRST_TOKEN_WRITTEN: "fake_path:write",
            "never": None,
        }
        assert module.build(0) == 1
        module.write(1)  # not the first token (x != 2)
        assert asyncio.run(module.fetch()) == "message"
        assert recorder.current is not None and set(recorder.current) == {probes.RECEIVED, "fetched"}
        module.write(2)
        assert recorder.current is None and set(recorder.records[-1]) == {
            probes.RECEIVED,
            "fetched",
            probes.FIRST_TOKEN_WRITTEN,
        }
        assert calls == ["build", "write", "write"]
    finally:
        del sys.modules["fake_path"]


def test_counting_task_factory_counts_each_resumption() -> None:
    async def two_hops() -> int:
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return 7

    async def main() -> tuple[int, int]:
        asyncio.get_running_loop().set_task_factory(probes._counting_task_factory)
        before = probes.RECORDER.steps
        value = await asyncio.get_running_loop().create_task(two_hops())
        return value, probes.RECORDER.steps - before

    assert asyncio.run(main()) == (7, 3)  # the first step and one per sleep(0)
