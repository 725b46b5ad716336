"""The response head and the first body chunk in one write: one syscall and one packet, not two.

uvicorn writes the status line and headers to the socket as soon as ``http.response.start`` is
sent. A new event stream sends its first frame right after, in the same turn, so the two left as
two ``send`` syscalls and two packets; on loopback each small write costs the bridge 15-25 µs
and wakes the reader once more before its first frame. ``hold_head`` keeps the head back until
the next write and joins the two.

It works on uvicorn's ``RequestResponseCycle`` (the server's own ``send`` is its bound method) by
swapping the cycle's transport for the duration of the hold only: no wrapper stays on the path
of later writes, and no reference cycle outlives ``release`` (an ended session left to the
cyclic garbage collector grew RSS; see tests/test_memory_streams.py). Any other server's ``send``
gets no hold and writes as before.
"""

from __future__ import annotations

from typing import Any

from starlette.types import Send
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle


class HeldHead:
    """Stands in for the cycle's transport: keeps the first write, joins it to the second.

    ``release`` must follow (the caller's ``finally``): it restores the transport and writes a
    head still held, so a response whose first body write never came still has its head sent.
    """

    __slots__ = ("_cycle", "_head", "_transport")

    def __init__(self, cycle: RequestResponseCycle) -> None:
        self._cycle: RequestResponseCycle | None = cycle
        self._transport = cycle.transport
        self._head: bytes | None = None
        cycle.transport = self  # type: ignore[assignment]

    def write(self, data: bytes) -> None:
        if self._head is None and self._cycle is not None:
            self._head = bytes(data)
            return
        head, self._head = self._head, None
        self._restore()
        self._transport.write(data if head is None else head + data)

    def release(self) -> None:
        self._restore()
        head, self._head = self._head, None
        if head is not None and not self._transport.is_closing():
            self._transport.write(head)

    def _restore(self) -> None:
        cycle, self._cycle = self._cycle, None
        if cycle is not None and cycle.transport is self:  # type: ignore[comparison-overlap]
            cycle.transport = self._transport

    def __getattr__(self, name: str) -> Any:  # is_closing, close, get_extra_info...
        return getattr(self._transport, name)


def hold_head(send: Send) -> HeldHead | None:
    """Hold the response head of uvicorn's ``send`` until its next write; None for any other server."""
    cycle = getattr(send, "__self__", None)
    if type(cycle) is not RequestResponseCycle or cycle.response_started:
        return None
    return HeldHead(cycle)
