"""One shared timer that paces every stream.

A timer per stream per token costs the stub more CPU than the bridge under test at a few
thousand paced streams, so benchmarks would measure the stub. Here all waiting streams are
released together on the next tick of one periodic timer.
"""

from __future__ import annotations

import asyncio


class Ticker:
    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._waiters: list[asyncio.Future[None]] = []
        self._armed = False

    async def wait(self) -> None:
        """Return at the next tick. Cancelling one waiter never affects the others."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        if not self._armed:
            self._armed = True
            loop.call_later(self.interval_s, self._tick)
        await waiter

    def _tick(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._armed = False
