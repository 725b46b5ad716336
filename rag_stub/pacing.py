"""One shared timer that paces every stream, each stream keeping its own phase.

A timer per stream per token costs the stub more CPU than the bridge under test at a few
thousand paced streams, so benchmarks would measure the stub. A single periodic tick that
releases every waiting stream at once is cheap but puts all streams in phase: hundreds of streams
then write, and are closed, in the same millisecond, and the benchmark measures the queue behind
that burst (a direct gRPC client's cancellation latency suffers as much as the bridge's). Here the
pacing interval is cut into ``slots``; a stream waits for the slot its own deadline falls in, and
one timer handle, armed for the earliest occupied slot, serves them all. Streams keep their phase
within one slot (``interval / slots``) and load reaches the server spread over the interval, as
real token generation would.
"""

from __future__ import annotations

import asyncio
import math


class Ticker:
    def __init__(self, interval_s: float, slots: int = 10) -> None:
        if interval_s <= 0 or slots < 1:
            raise ValueError("interval_s must be > 0 and slots >= 1")
        self.interval_s = interval_s
        self.slot_s = interval_s / slots
        self.fires = 0  # timer callbacks run so far (tests check there is one per occupied slot)
        self._due: dict[int, list[asyncio.Future[None]]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_slot: int | None = None

    async def wait(self, previous: float | None = None) -> float:
        """Wait for the next token's turn; return its deadline (pass it back on the next call).

        The deadline is ``previous + interval`` (no drift over a long answer). A stream that fell
        behind waits for the next slot instead of catching up in a burst.
        """
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = now + self.interval_s if previous is None else previous + self.interval_s
        if deadline <= now:  # behind: the next slot, and the pace restarts from there
            deadline = (math.floor(now / self.slot_s) + 1) * self.slot_s
        slot = math.ceil(deadline / self.slot_s)
        waiter: asyncio.Future[None] = loop.create_future()
        self._due.setdefault(slot, []).append(waiter)
        if self._timer_slot is None or slot < self._timer_slot:
            if self._timer is not None:
                self._timer.cancel()
            self._arm(loop, slot)
        await waiter
        return deadline

    def _arm(self, loop: asyncio.AbstractEventLoop, slot: int) -> None:
        self._timer_slot = slot
        self._timer = loop.call_at(slot * self.slot_s, self._fire, loop)

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        self.fires += 1
        fired = self._timer_slot
        assert fired is not None
        self._timer = self._timer_slot = None
        # The loop runs a timer up to one clock resolution early: release by the armed slot too.
        now_slot = max(fired, math.floor(loop.time() / self.slot_s))
        for slot in [s for s in self._due if s <= now_slot]:
            for waiter in self._due.pop(slot):
                if not waiter.done():  # a cancelled waiter never affects the others
                    waiter.set_result(None)
        if self._due:
            self._arm(loop, min(self._due))
