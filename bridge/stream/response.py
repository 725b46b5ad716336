"""The HTTP half of a stream: an ASGI response that writes a ``FrameSource``'s frames to the socket.

Heartbeats fill silences and a reader that takes no bytes for SEND_TIMEOUT_S is dropped, both from
one timer per stream; a disconnect detaches the reader at once (so, without a resume window, the
upstream call is cancelled within an event-loop turn).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from bridge import sse
from bridge.errors import BridgeError, ClientGone
from bridge.headwrite import hold_head
from bridge.stream.face import NATIVE, StreamFace
from bridge.stream.source import FrameSource, Notifier

log = logging.getLogger("bridge.stream")

# Where bridge.app.BridgeApp keeps the server's unwrapped ``send`` in the ASGI scope.
RAW_SEND_KEY = "bridge.raw_send"


class ConnectionGauge(Protocol):
    def connection_opened(self) -> None: ...

    def connection_closed(self) -> None: ...


class Opening(Protocol):
    """A new stream's open, settled once by its response (``bridge.stream.opener.OpenStream``)."""

    async def answered(self) -> BridgeError | None:
        """Wait until the stream ended, ``release`` or the accept wait; the refusal, if refused."""
        ...

    def release(self) -> None: ...

    @property
    def token_sent(self) -> bool: ...

    def accepted(self) -> None: ...

    def refused(self, error: BridgeError) -> None: ...

    def interrupted(self) -> None: ...


# A new stream whose first frames are out but whose first token is not: the request task takes
# over from the pump this long after the first write (disconnect watcher, heartbeats, announce).
OPENING_HANDOFF_S = 0.002


class EventStreamResponse(Response):
    """The HTTP half: writes a source's frames, heartbeats in the gaps, and watches for disconnect.

    A new stream (``opening``) is answered by its pump first: the status line and the first frames
    leave from the pump's task in the turn the first message arrives, and so does every frame up
    to the first token (``_first_frames``). Only then does the request task wake up and do its
    share (announce the stream, start the disconnect watcher and the heartbeat timer). Woken at
    the first message instead, its ~0.2 ms of work sat between the metadata frame and the first
    token, on a core it shares with gRPC's threads: the token's read waited for it.
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
        """``opening``: a new stream's open, settled by this response (see the class docstring);
        ``face``: the format of its heartbeats and of a refusal's HTTP answer (bridge/stream/face.py)."""
        self.session = session
        self.opening = opening
        self.face = face
        self.after_seq = after_seq
        self.extra_headers = headers or {}
        self.connections = connections
        self.status_code = 200
        self.background = None
        self._send_since: float | None = None  # loop time at which the current send began
        self._timer: asyncio.TimerHandle | None = None
        self._last_write = 0.0  # loop time of the last write (heartbeats fill the gaps)
        self._heartbeat_due = False
        self._body_send: Send | None = None
        self._start_send: Send | None = None
        self._head_sent = False
        self._handoff: asyncio.TimerHandle | None = None
        self._generation = 0
        self._handover_used = False
        self._handing_over = False  # the producer is writing for the parked writer
        self._handed_over = Notifier()
        self._gone: ClientGone | None = None
        # Built here, not when the status goes out: a new stream's response is made while the RAG
        # service works on its first message (bridge.stream.opener), off the path to the first byte.
        self._head = self._raw_headers()
        self._timed_out = False  # the timer cancelled the writer: a send was blocked for SEND_TIMEOUT_S

    def _raw_headers(self) -> list[tuple[bytes, bytes]]:
        ids = {"x-connection-id": self.session.stream_id, "x-request-id": self.session.request_id}
        return sse.response_headers(self.session.policy.heartbeat_interval_s, {**ids, **self.extra_headers})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.connections is None:
            await self._serve(scope, receive, send)
            return
        self.connections.connection_opened()
        try:
            await self._serve(scope, receive, send)
        finally:
            self.connections.connection_closed()

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Headers go through the middleware stack (CORS adds its headers there); body chunks go
        # straight to the server's own send, skipping a wrapper per middleware layer per token
        # (a few percent of a core at full throughput; see bridge.app.BridgeApp). No middleware
        # may rewrite an event stream's body anyway: compression would hold frames back.
        body_send: Send = scope.get(RAW_SEND_KEY, send)
        session = self.session
        generation = session.attach(self.after_seq)
        if isinstance(generation, BridgeError):  # expired between the resume check and now
            await ErrorFrameResponse(f"{session.stream_id}:{self.after_seq}", generation)(scope, receive, send)
            return
        self._body_send, self._start_send, self._generation = body_send, send, generation
        try:
            if self.opening is None:
                await self._write_head()
            elif not await self._opened(scope, receive, send, self.opening):
                return
        except ClientGone:
            session.detach(generation)
            return
        # The writer is this task (a task of its own cost a creation and a wake-up before the first
        # token); the watcher is the one other task. The send timeout cancels this task, and only
        # a cancellation the timer asked for is taken back (``uncancel``): a server shutdown's is not.
        task = asyncio.current_task()
        assert task is not None
        watcher = asyncio.ensure_future(self._watch(receive, generation))
        self._start_timer(task)
        completed = False
        try:
            await self._write(body_send, generation)
            completed = True
        except ClientGone:
            pass
        except Exception as exc:  # pragma: no cover - a bug; the reader is detached as on a hang-up
            log.warning("stream %s: writer failed: %r", session.stream_id, exc)
        except asyncio.CancelledError:
            if not self._timed_out:
                raise
            task.uncancel()
        finally:
            session.park(None)
            self._handover_used = True
            if self._timer is not None:
                self._timer.cancel()
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            if completed:
                session.release(generation)
                with contextlib.suppress(Exception):
                    await body_send({"type": "http.response.body", "body": b"", "more_body": False})
            else:
                session.detach(generation)

    async def _write_head(self) -> None:
        """The status line and the frames held, in one write (bridge/headwrite.py).

        As two writes they were two syscalls and two packets, each waking the reader.
        """
        session, body_send, start_send = self.session, self._body_send, self._start_send
        assert body_send is not None and start_send is not None
        self._head_sent = True
        body, last = session.take()
        held = hold_head(body_send) if body else None
        try:
            await start_send({"type": "http.response.start", "status": 200, "headers": self._head})
            if body:
                await self._send(body_send, body)
        finally:
            if held is not None:
                held.release()
        if body:
            session.acknowledge(last, self._generation)

    async def _opened(self, scope: Scope, receive: Receive, send: Send, opening: Opening) -> bool:
        """Settle a new stream's open; False when it was answered otherwise (an HTTP error).

        The pump writes meanwhile (``_first_frames``); this task sleeps until the first token is
        out, the stream ended, ``OPENING_HANDOFF_S`` after the first frames, or the accept wait.
        """
        session = self.session
        session.park(self._first_frames)
        try:
            refusal = await opening.answered()
        except BaseException:
            session.park(None)
            opening.interrupted()
            raise
        session.park(None)
        if self._handoff is not None:
            self._handoff.cancel()
            self._handoff = None
        if refusal is not None and not self._head_sent:
            opening.refused(refusal)
            await self.face.error_response(refusal, self.extra_headers)(scope, receive, send)
            return False
        opening.accepted()
        while self._handing_over:  # the pump's write of the first frames is held by flow control
            await self._handed_over.wait()
        self._handover_used = opening.token_sent  # the first token left from the pump already
        if self._gone is not None:
            raise self._gone
        if not self._head_sent:
            await self._write_head()
        return True

    async def _first_frames(self) -> None:
        """The pump's handover while a new stream opens: the head with the first frames, then
        each frame in the turn its message arrived, until the first token is out."""
        opening = self.opening
        if opening is None or self._gone is not None or self._handing_over:
            return
        write = self._write_head() if not self._head_sent else self._write_held()
        if not await self._write_for_writer(write, opening.release):
            return
        if opening.token_sent:
            opening.release()
        elif self._handoff is None:
            self._handoff = asyncio.get_running_loop().call_later(OPENING_HANDOFF_S, opening.release)

    def _start_timer(self, writer: asyncio.Task[None]) -> None:
        """One timer per stream for both heartbeats and the send timeout.

        It fires when a heartbeat falls due (HEARTBEAT_INTERVAL_S after the last write), and at
        least every SEND_TIMEOUT_S; a send blocked for SEND_TIMEOUT_S cancels the writer, found
        within about one more period. A busy stream sees a tick per min(interval, timeout); no
        timer is armed per token or per wait.
        """
        loop = asyncio.get_running_loop()
        policy = self.session.policy
        interval, limit = policy.heartbeat_interval_s, policy.send_timeout_s

        def tick() -> None:
            now = loop.time()
            since = self._send_since
            if since is not None:  # a send is under way: due to time out at since + limit
                if now - since >= limit:
                    self._timed_out = True
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
        session = self.session
        while session.generation == generation:
            session.park(None)  # from here the writer writes (parked again only in changed())
            if self._gone is not None:
                raise self._gone
            if self._handing_over:  # the producer's write for us is held by flow control
                await self._handed_over.wait()
                continue
            body, last = session.take()
            if body:
                await self._send(send, body)
                session.acknowledge(last, generation)
                continue
            if session.finished:
                return
            if self._heartbeat_due:
                self._heartbeat_due = False
                await self._send(send, self.face.heartbeat(session.stream_id, session.sent_seq))
                continue
            session.park(None if self._handover_used else self._handover)
            try:
                await session.changed()
            finally:
                session.park(None)

    async def _handover(self) -> None:
        """Write the frames just appended, from the producer's task, while the writer is parked.

        Offered once per response, for the first token: its frame then leaves in the turn its
        message arrived instead of a hop later. The writer stays the owner of everything else:
        it waits while this write is under way, so frames never interleave, and a failed write
        reaches it as ``ClientGone``.
        """
        session, send = self.session, self._body_send
        if self._handover_used or self._handing_over or send is None or session.generation != self._generation:
            return
        self._handover_used = True
        session.park(None)
        await self._write_for_writer(self._write_held(), session.wake)

    async def _write_for_writer(self, write: Coroutine[Any, Any, None], wake_writer: Callable[[], None]) -> bool:
        """Run a producer's ``write`` for the parked writer; False if the client is gone.

        The writer waits while ``_handing_over`` is set, so frames never interleave; a failed
        write reaches it as ``ClientGone`` once ``wake_writer`` woke it.
        """
        self._handing_over = True
        try:
            await write
        except ClientGone as exc:
            self._gone = exc
            wake_writer()
            return False
        finally:
            self._handing_over = False
            self._handed_over.notify()
        return True

    async def _write_held(self) -> None:
        """The frames not yet written, in one write (nothing when none are held)."""
        session, send = self.session, self._body_send
        assert send is not None
        body, last = session.take()
        if body:
            await self._send(send, body)
            session.acknowledge(last, self._generation)

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
        """Wait for the client to hang up, then detach at once.

        Detaching here rather than after the writer has been cancelled and collected saves the
        event-loop turns in between: under load each turn is milliseconds, and the upstream call
        (cancelled by ``detach`` when there is no resume window) would keep running meanwhile.
        Detaching twice is harmless: the response's own ``detach`` in ``__call__`` then finds the
        reader already gone.
        """
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.session.detach(generation)
                if self._gone is None:  # the writer (this response's own task) stops at its next step
                    self._gone = ClientGone("the client disconnected")
                self.session.wake()
                return


class ErrorFrameResponse(Response):
    """A whole event stream made of one ``error`` frame: the answer to a late or invalid resume.

    Sent as raw ASGI messages like every other event stream (a Starlette ``Response`` would add a
    Content-Length, which an event stream never carries).
    """

    def __init__(self, event_id: str, error: BridgeError) -> None:
        self.event_id = event_id
        self.error = error
        self.status_code = 200
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [
            (b"content-type", EventStreamResponse.media_type.encode()),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        body = sse.json_frame(self.event_id, self.error.frame())
        await send({"type": "http.response.body", "body": body, "more_body": False})
