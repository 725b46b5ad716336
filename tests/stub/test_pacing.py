"""The stub's shared pacing timer: one timer handle, streams keep their own phase, no drift."""

from __future__ import annotations

import asyncio

import pytest

from rag_stub.pacing import Ticker

INTERVAL = 0.04


async def _pace(ticker: Ticker, tokens: int, woke: list[float]) -> None:
    loop = asyncio.get_running_loop()
    deadline = None
    for _ in range(tokens):
        deadline = await ticker.wait(deadline)
        woke.append(loop.time())


async def test_streams_started_apart_keep_their_phase() -> None:
    """Two streams started half an interval apart are released half an interval apart.

    The previous ticker released every waiter on one tick, so both would wake together.
    """
    ticker = Ticker(INTERVAL, slots=8)
    a: list[float] = []
    b: list[float] = []
    first = asyncio.create_task(_pace(ticker, 5, a))
    await asyncio.sleep(INTERVAL / 2)  # the phase offset under test, not synchronisation
    await asyncio.gather(first, _pace(ticker, 5, b))
    offsets = [(tb - ta) % INTERVAL for ta, tb in zip(a, b, strict=True)]
    for offset in offsets:
        assert INTERVAL / 2 - ticker.slot_s <= offset <= INTERVAL / 2 + 2 * ticker.slot_s, offsets


async def test_the_pace_does_not_drift() -> None:
    ticker = Ticker(INTERVAL, slots=10)
    woke: list[float] = []
    loop = asyncio.get_running_loop()
    started = loop.time()
    await _pace(ticker, 10, woke)
    elapsed = woke[-1] - started
    # Ten deadlines of previous + interval: 0.4 s; rounding to a slot never accumulates.
    assert 10 * INTERVAL <= elapsed + 0.002 <= 10 * INTERVAL + 3 * ticker.slot_s, elapsed


async def test_one_timer_serves_many_streams() -> None:
    """200 streams in lockstep occupy one slot per token: one timer callback each, not 200."""
    ticker = Ticker(INTERVAL, slots=10)
    woke: list[float] = []

    async def stream() -> None:
        await _pace(ticker, 3, woke)

    await asyncio.gather(*(stream() for _ in range(200)))
    assert len(woke) == 600
    assert ticker.fires <= 6, ticker.fires  # 3 tokens; a start straddling a slot edge can add one each


async def test_cancelling_one_waiter_leaves_the_others() -> None:
    ticker = Ticker(INTERVAL, slots=4)
    woke: list[float] = []
    doomed = asyncio.create_task(ticker.wait())
    survivor = asyncio.create_task(_pace(ticker, 2, woke))
    await asyncio.sleep(0)
    doomed.cancel()
    await survivor
    assert len(woke) == 2
    with pytest.raises(asyncio.CancelledError):
        await doomed


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        Ticker(0)
    with pytest.raises(ValueError):
        Ticker(0.05, slots=0)
