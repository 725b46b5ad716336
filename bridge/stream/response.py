"""The HTTP half of a stream: an ASGI response that writes a ``FrameSource``'s frames to the socket.

Per response, three parts, supervised by the request task:

- the writer task: the status line, then frames as they are appended, and a heartbeat when one
  is due;
- the disconnect watcher task: a hang-up detaches the reader in the turn it arrives (without a
  resume window that cancels the upstream call there and then, not after the writer unwound);
- one timer: it marks a heartbeat due after HEARTBEAT_INTERVAL_S of silence and cancels the
  writer once a send has been blocked for SEND_TIMEOUT_S (a reader that stopped reading).

Whichever task ends first ends the response; the other is cancelled.

A new stream (``opening``) first settles its open: the status waits for the RAG service's first
frame, so that a refusal before any frame is answered as an HTTP error. Until its first token is
out, its frames are written by the pump, in the turn each message arrived (``_write_opening``),
while the request task sleeps; the request task starts the three parts afterwards. Woken at the
first message instead, its work (accepting the stream, starting the parts, the writer's first
hop) sat between the metadata frame and the first token, on a core it shares with gRPC's poller
thread, and delayed the first token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from bridge import sse
from bridge.errors import BridgeError, ClientGone
from bridge.stream.face import NATIVE, StreamFace
from bridge.stream.source import FrameSource

log = logging.getLogger("bridge.stream")

# A new stream whose first frames are out but whose first token is not: the request task takes
# over from the pump this long after the pump's first write (disconnect watcher, heartbeats).
OPENING_HANDOFF_S = 0.002


class ConnectionGauge(Protocol):
    def connection_opened(self) -> None: ...

    def connection_closed(self) -> None: ...


class Opening(Protocol):
    """A new stream's open, settled once by its response (``bridge.stream.opener.OpenStream``)."""

    def park(self, handover: Callable[[], Awaitable[None]] | None) -> None:
        """Have the pump await ``handover`` right after each frame it appends (None: no more)."""
        ...

    async def answered(self) -> BridgeError | None:
        """Wait until ``release``, the end of the stream or the accept wait; the refusal, if refused."""
        ...

    def release(self) -> None: ...

    @property
    def token_sent(self) -> bool: ...

    def accepted(self) -> None: ...

    def refused(self, error: BridgeError) -> None: ...

    def interrupted(self) -> None: ...


class EventStreamResponse(Response):
    """Writes a source's frames, heartbeats in the gaps, and watches for disconnect (module docstring).

    A Starlette ``Response`` with its headers in ``raw_headers`` (``headers`` reads and edits them
    until the response starts) and no body: an event stream never carries a Content-Length.
    """

    media_type = sse.MEDIA_TYPE

    def __init__(
        self,
        session: FrameSource,
        after_seq: int = 0,
        *,
        headers: dict[str, str] | None = None,
        connections: ConnectionGauge | None = None,
        opening: Opening | None = None,
        face: StreamFace = NATIVE,
    ) -> None:
        """``headers``: the admission's headers (rate limits), also on an HTTP error answering a
        refusal; ``opening``: a new stream's open, settled by this response; ``face``: the format
        of its heartbeats and of a refusal's HTTP answer (bridge/stream/face.py)."""
        self.session = session
        self.after_seq = after_seq
        self.opening = opening
        self.face = face
        self.connections = connections
        self.extra_headers = headers or {}
        self.status_code = 200
        self.background = None
        ids = {"x-connection-id": session.stream_id, "x-request-id": session.request_id}
        self.raw_headers = sse.response_headers(session.policy.heartbeat_interval_s, {**ids, **self.extra_headers})
        self._timer: asyncio.TimerHandle | None = None
        self._send_since: float | None = None  # loop time at which the send under way began
        self._last_write = 0.0  # loop time of the last write (heartbeats fill the gaps)
        self._heartbeat_due = False
        self._started = False  # the status line is out
        self._writing = asyncio.Lock()  # one writer at a time: the pump while opening, then the writer task
        self._handoff: asyncio.TimerHandle | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.connections is None:
            await self._serve(scope, receive, send)
        else:
            self.connections.connection_opened()
            try:
                await self._serve(scope, receive, send)
            finally:
                self.connections.connection_closed()
        if self.background is not None:
            await self.background()

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        session = self.session
        generation = session.attach(self.after_seq)
        if isinstance(generation, BridgeError):  # expired between the resume check and now
            event_id = f"{session.stream_id}:{self.after_seq}"
            await ErrorFrameResponse(event_id, generation, session.policy.heartbeat_interval_s)(scope, receive, send)
            return
        if self.opening is not None and not await self._open(scope, receive, send, self.opening, generation):
            return
        writer = asyncio.ensure_future(self._write(send, generation))
        watcher = asyncio.ensure_future(self._watch(receive, generation))
        self._start_timer(writer)
        completed = False
        try:
            done, _ = await asyncio.wait((writer, watcher), return_when=asyncio.FIRST_COMPLETED)
            # Only a writer that ran out of frames completed the stream: not one cancelled by the
            # send timeout, nor one that wrote the last frame as the client hung up.
            completed = watcher not in done and not writer.cancelled() and writer.exception() is None
        finally:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            writer.cancel()
            watcher.cancel()
            for outcome in await asyncio.gather(writer, watcher, return_exceptions=True):
                if isinstance(outcome, Exception) and not isinstance(outcome, ClientGone):
                    log.warning("stream %s: %r", session.stream_id, outcome)  # pragma: no cover - a bug
            if completed:
                session.release(generation)
                with contextlib.suppress(Exception):
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
            else:
                session.detach(generation)  # a second detach (after the watcher's) is a no-op

    async def _open(self, scope: Scope, receive: Receive, send: Send, opening: Opening, generation: int) -> bool:
        """Settle a new stream's open; False when it was refused (answered by an HTTP error).

        The pump writes meanwhile (``_write_opening``); this task sleeps until the first token is
        out, ``OPENING_HANDOFF_S`` after the pump's first write, the end of the stream, or the
        accept wait.
        """

        async def write_opening() -> None:
            await self._write_opening(send, generation, opening)

        opening.park(write_opening)
        try:
            refusal = await opening.answered()
        except BaseException:
            opening.interrupted()
            raise
        finally:
            opening.park(None)
            if self._handoff is not None:
                self._handoff.cancel()
                self._handoff = None
        if refusal is not None:  # a status before any frame: the pump wrote nothing
            opening.refused(refusal)
            await self.face.error_response(refusal, self.extra_headers)(scope, receive, send)
            return False
        opening.accepted()
        return True

    async def _write_opening(self, send: Send, generation: int, opening: Opening) -> None:
        """The pump's write, right after it appended a frame, while the stream opens: the status
        line and the frames held, then each new frame. It wakes the request task once the first
        token is out, or ``OPENING_HANDOFF_S`` after the first write (so that a slow first token
        still gets heartbeats and a disconnect watcher)."""
        if self._writing.locked():  # a write of ours is under way: the writer task sends this frame
            return
        async with self._writing:
            try:
                await self._write_held(send, generation)
            except ClientGone:  # the writer task meets the closed connection and detaches
                opening.release()
                return
        if opening.token_sent:
            opening.release()
        elif self._handoff is None:
            self._handoff = asyncio.get_running_loop().call_later(OPENING_HANDOFF_S, opening.release)

    def _start_timer(self, writer: asyncio.Future[None]) -> None:
        """One timer per stream for both heartbeats and the send timeout.

        It fires when a heartbeat falls due (HEARTBEAT_INTERVAL_S after the last write), and at
        least every SEND_TIMEOUT_S; a send blocked for SEND_TIMEOUT_S cancels the writer, found
        within about one more period. No timer is armed per frame or per wait.
        """
        loop = asyncio.get_running_loop()
        policy = self.session.policy
        interval, limit = policy.heartbeat_interval_s, policy.send_timeout_s

        def tick() -> None:
            now = loop.time()
            since = self._send_since
            if since is not None:  # a send is under way: due to time out at since + limit
                if now - since >= limit:
                    self._timer = None
                    writer.cancel()
                    return
                next_at = since + limit
            else:
                next_at = self._last_write + interval
                if now >= next_at:
                    self._heartbeat_due = True
                    self.session.wake()
                    next_at = now + interval
                # A send may start right after this tick: look again within SEND_TIMEOUT_S.
                next_at = min(next_at, now + limit)
            self._timer = loop.call_at(next_at, tick)

        self._last_write = loop.time()
        self._timer = loop.call_at(self._last_write + min(interval, limit), tick)

    async def _write(self, send: Send, generation: int) -> None:
        """Every frame until the source finishes or a newer reader took over (the status line
        first, if the pump did not send it)."""
        session = self.session
        async with self._writing:  # a write of the pump's, held by flow control, ends first
            # The status line goes out even when a newer reader took over before this one wrote
            # anything: an ASGI response that ends unstarted is answered 500 by the server.
            await self._start(send)
            while session.generation == generation:
                if await self._write_held(send, generation):
                    continue
                if session.finished:
                    return
                if self._heartbeat_due:
                    self._heartbeat_due = False
                    await self._send(send, self.face.heartbeat(session.stream_id, session.sent_seq))
                    continue
                await session.changed()

    async def _write_held(self, send: Send, generation: int) -> bool:
        """The status line if not yet out, then the frames not yet written in one write; False
        when there were none."""
        await self._start(send)
        session = self.session
        body, last = session.take()
        if not body:
            return False
        await self._send(send, body)
        session.acknowledge(last, generation)
        return True

    async def _start(self, send: Send) -> None:
        """The status line, once per response."""
        if not self._started:
            self._started = True
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})

    async def _send(self, send: Send, body: bytes) -> None:
        loop = asyncio.get_running_loop()
        self._send_since = loop.time()
        try:
            await send({"type": "http.response.body", "body": body, "more_body": True})
        except OSError as exc:
            raise ClientGone(str(exc)) from None
        finally:
            self._send_since = None
            self._last_write = loop.time()

    async def _watch(self, receive: Receive, generation: int) -> None:
        """Wait for the client to hang up, then detach at once (see the module docstring)."""
        while (await receive())["type"] != "http.disconnect":
            pass
        self.session.detach(generation)


class ErrorFrameResponse(Response):
    """A whole event stream made of one ``error`` frame: the answer to a late or invalid resume."""

    media_type = sse.MEDIA_TYPE

    def __init__(self, event_id: str, error: BridgeError, heartbeat_interval_s: float) -> None:
        self.event_id = event_id
        self.error = error
        self.status_code = 200
        self.background = None
        self.raw_headers = sse.response_headers(heartbeat_interval_s, {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        body = sse.json_frame(self.event_id, self.error.frame())
        await send({"type": "http.response.body", "body": body, "more_body": False})
        if self.background is not None:
            await self.background()
