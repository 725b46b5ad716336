"""The HTTP/1.1 connection: uvicorn's httptools protocol with the request head bounded as it arrives.

httptools (llhttp) has no header size limit: it keeps a header value across reads until the value
ends, and uvicorn hands the app the headers only once the whole head is in. A limit checked by the
app (bridge/middleware.py) alone comes after the buffering: one connection sending an endless header
grows the process by every byte it sends. Nor does uvicorn bound how long a head may take: its
keep-alive timer is cancelled by the first byte of the next request and a fresh connection has
none, so a client trickling a byte at a time (slowloris), or sending nothing, would hold its
connection and parser forever.

This protocol

- counts the bytes of every request head while it is read and, once a head is over
  ``max_head_bytes``, answers 431 and closes without feeding the parser another byte (it drops at
  most ``LINGER_BYTES`` more first, so that the answer is not lost to a reset);
- closes a connection whose next request head has not arrived ``head_timeout_s`` after the
  connection opened or the head's first byte arrived (408 when a request was under way);
- closes a connection whose request body (a chunked body's trailers included) is not complete
  ``body_timeout_s`` after its head was (408 unless a response is under way);
- closes a connection idle ``keepalive_timeout_s`` between requests (uvicorn's own timer);
- parses no further than ``MAX_PIPELINED_REQUESTS`` requests queued behind the response under
  way, and reads nothing more until the queue shrinks (the rest of the read is held);
- never lets a chunked body's trailer fields into the request's headers (``on_header``);

and reports each close by reason. An open response (an SSE stream) is never idle: no timer runs
while a request is being answered and its head is complete.

The invariants live in small collaborators (bridge/server/budget.py: the byte budget, the deadline,
the held pipeline, the linger); this class is the adapter that wires them to uvicorn's callbacks.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

import httptools

from bridge.config import Settings
from bridge.errors import BridgeError, RequestBodyTimeout, RequestHeadTimeout, RequestHeadTooLarge
from bridge.server.budget import (
    SLICE_BYTES,
    Deadline,
    HoldableFlow,
    Linger,
    WireBudget,
    content_length,
    error_response,
)
from bridge.server.uvicorn_fence import Config, HttpToolsProtocol, ServerState
from bridge.types import ConnectionCloseReason

# What the wire count sees and the app-level count (URL + headers) does not: method, the URL's
# scheme and host in absolute form, " HTTP/1.1", the blank line; plus one slice of over-charge.
# So every head the app-level guard accepts also passes on the wire.
WIRE_ALLOWANCE_BYTES = 1024 + SLICE_BYTES
# After answering 431, what the bridge still reads and drops so the answer is not lost to a
# reset (see Linger); a flood is cut off after this much more.
LINGER_BYTES = 64 * 1024
LINGER_S = 2.0
# Requests a client may queue behind a response under way (HTTP/1.1 pipelining). uvicorn keeps
# reading while a streamed response watches for disconnects, and parses every queued head into a
# request cycle, so without this cap memory grows with every pipelined GET a client sends.
MAX_PIPELINED_REQUESTS = 64


class ConnectionCloseObserver(Protocol):
    def connection_closed_by_bridge(self, reason: ConnectionCloseReason) -> None: ...


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    max_head_bytes: int
    head_timeout_s: float
    keepalive_timeout_s: float
    body_timeout_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        return cls(
            max_head_bytes=settings.max_header_bytes + WIRE_ALLOWANCE_BYTES,
            head_timeout_s=settings.header_timeout_s,
            keepalive_timeout_s=settings.keepalive_timeout_s,
            body_timeout_s=settings.body_timeout_s,
        )


def protocol_class(limits: ConnectionLimits, observer: ConnectionCloseObserver) -> type[HttpToolsProtocol]:
    """The protocol class to give ``uvicorn.Config(http=...)``, bound to these limits and observer.

    uvicorn builds one protocol per connection from the class alone, so the settings travel as
    class attributes of a subclass made per server.
    """

    class BridgeHttpProtocol(HeadLimitedProtocol):
        pass

    BridgeHttpProtocol.limits = limits
    BridgeHttpProtocol.observer = observer
    return BridgeHttpProtocol


class HeadLimitedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with each request head bounded in bytes and time as it arrives."""

    limits: ClassVar[ConnectionLimits]
    observer: ClassVar[ConnectionCloseObserver]

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        # uvicorn.Config only takes whole seconds; the protocol reads the attribute when it arms.
        self.timeout_keep_alive = self.limits.keepalive_timeout_s  # type: ignore[assignment]
        self._budget = WireBudget(self.limits.max_head_bytes)
        self._head_deadline = Deadline(self.loop, self.limits.head_timeout_s, self._head_timed_out)
        # Armed once a read leaves a request's body incomplete, so a bodiless request costs no timer.
        self._body_deadline = Deadline(self.loop, self.limits.body_timeout_s, self._body_timed_out)
        # Set when the connection is to close once the responses under way are complete (False:
        # not closing; None: close without an answer).
        self._closing_with: BridgeError | Literal[False] | None = False
        self._linger = Linger(LINGER_BYTES, LINGER_S)
        self._in_trailers = False  # the head of the request being parsed is complete

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.flow = self._flow = HoldableFlow(transport)
        self._head_deadline.arm()  # a connection that never sends a byte is closed too

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_deadline.cancel()
        self._body_deadline.cancel()
        self._linger.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._linger.active:
            if not self._linger.discard(len(data)):
                self.transport.close()
            return
        if self._closing_with is not False:  # uvicorn resumed reading; still nothing is parsed
            self.transport.pause_reading()
            return
        self._unset_keepalive_if_required()
        if self._flow.holding:  # reading was paused; a read already under way joins the held bytes
            self._flow.join(data)
            return
        if self._budget.bytes_arrived():
            self._head_deadline.arm()
        self._parse(memoryview(data))

    def _parse(self, view: memoryview) -> None:
        while view and not self.transport.is_closing() and self._closing_with is False:
            if len(self.pipeline) >= MAX_PIPELINED_REQUESTS:
                self._flow.hold(bytes(view))
                return
            size = self._budget.next_slice_size(len(view))
            if size == 0:
                self._close(
                    "header_too_large",
                    RequestHeadTooLarge(f"request head over {self.limits.max_head_bytes} bytes"),
                )
                return
            if not self._feed(view[:size]):
                return
            view = view[size:]
        if self._budget.in_body and not self.transport.is_closing():
            self._body_deadline.arm()  # counts from the end of the head: later reads do not push it back

    def timeout_keep_alive_handler(self) -> None:
        if not self.transport.is_closing():
            self.observer.connection_closed_by_bridge("keepalive_idle")
        super().timeout_keep_alive_handler()

    # ------------------------------------------------------------------ httptools callbacks

    def on_message_begin(self) -> None:
        self._budget.message_begun()
        self._head_deadline.arm()
        self._in_trailers = False
        super().on_message_begin()

    def on_header(self, name: bytes, value: bytes) -> None:
        """A field of the request head; a field of a chunked body's trailer section is dropped.

        llhttp reports trailer fields through this same callback and uvicorn appended them to the
        list the app reads as the request's headers (RFC 9110 6.5.1 forbids that merge). A proxy
        that forwards trailers (Go's ReverseProxy does) rewrites the head, not the trailer: a
        client's ``X-Forwarded-For: 6.6.6.6`` trailer became the right-most hop the bridge
        believes, and an ``x-user-id`` trailer the identity the proxy had cleared from the head.
        The bridge reads nothing from a trailer, so it keeps none.
        """
        if not self._in_trailers:
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_trailers = True
        self._head_deadline.cancel()
        self._budget.headers_complete(content_length(self.headers))
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._budget.body_parsed(len(body))
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._body_deadline.cancel()
        self._budget.message_complete()
        super().on_message_complete()

    # ------------------------------------------------------------------ internals

    def _feed(self, piece: memoryview) -> bool:
        """Parse ``piece``; False when the connection must not be parsed any further."""
        self._budget.feeding(len(piece))
        try:
            self.parser.feed_data(piece)
        except httptools.HttpParserError:
            message = "Invalid HTTP request received."
            self.logger.warning(message)
            self.send_400_response(message)
            return False
        except httptools.HttpParserUpgrade:
            # As uvicorn: hand over to the WebSocket protocol, or refuse; the rest of the read is
            # not HTTP/1.1 any more either way.
            if self._should_upgrade():
                self._head_deadline.cancel()
                self._body_deadline.cancel()
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return False
        finally:
            self._budget.feeding(0)
        return True

    def _head_timed_out(self) -> None:
        if self.transport.is_closing():
            return
        if self.flow.read_paused:
            # uvicorn stopped reading (pipelined requests waiting): the client is not the slow one.
            self._head_deadline.arm()
            return
        error = RequestHeadTimeout(f"request head not received within {self.limits.head_timeout_s:g} s")
        self._close("header_timeout", error if self._budget.head_begun else None)

    def _body_timed_out(self) -> None:
        """The body (or its trailers) is late: 408 to a request still waiting for it, else just close.

        Once the request is being handled the connection is closed at once, not after its
        response: the request being read holds the connection (nothing behind it is parsed) and
        its handler may be waiting for the body. The 408 goes only where the request's own
        response has not started: written into one (answered before its body ended) it would
        corrupt that response's body.
        """
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if self.flow.read_paused or any(queued is cycle for queued, _ in self.pipeline):
            # The bridge stopped reading (a body not yet consumed), or the request waits its turn
            # behind a response under way: the client is not the slow one, and a close now would
            # cut a neighbour's response. Its deadline counts again from now.
            self._body_deadline.arm()
            return
        self._head_deadline.cancel()
        self.observer.connection_closed_by_bridge("body_timeout")
        error = RequestBodyTimeout(f"request body not received within {self.limits.body_timeout_s:g} s")
        self._answer_and_close(None if cycle.response_started else error)

    def _close(self, reason: ConnectionCloseReason, error: BridgeError | None) -> None:
        """Count the close, answer ``error`` and close; after the responses under way, if any.

        A request already being answered (an SSE stream, or pipelined requests queued behind it)
        gets its whole response first: the error written into it would corrupt its body, and
        closing at once would cut a well-formed request for its neighbour's fault. Meanwhile
        nothing more is read, so the wait costs no memory.
        """
        self._head_deadline.cancel()
        self._body_deadline.cancel()
        self.observer.connection_closed_by_bridge(reason)
        if self._budget.in_body and reason == "header_too_large" and self.cycle is not None:
            # The request being read is itself over the limit (its trailers): waiting for its
            # response would wait for a body that is never parsed. The app sees a disconnect.
            self._answer_and_close(None if self.cycle.response_started else error)
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self._closing_with = error
            self.transport.pause_reading()
            return
        self._answer_and_close(error)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._flow.holding and len(self.pipeline) < MAX_PIPELINED_REQUESTS and not self.transport.is_closing():
            self._parse(memoryview(self._flow.release()))
            if not self._flow.holding:
                self._flow.resume_reading()
        if self._closing_with is not False and self.cycle.response_complete:
            error, self._closing_with = self._closing_with, False
            if not self.transport.is_closing():
                self._answer_and_close(error)

    def _answer_and_close(self, error: BridgeError | None) -> None:
        """Write ``error`` (if any) and close, lingering briefly after a 431 or a late body: the
        client is still sending.

        The FIN goes after the answer, and the rest of the client's bytes are discarded (see
        Linger) rather than left unread, which would make the kernel reset the answer away.
        """
        self._unset_keepalive_if_required()
        if error is not None:
            self.transport.write(error_response(error, self.server_state.default_headers))
            if self.cycle is not None and not self.cycle.response_started:
                # The handler waiting for this request's body sees a disconnect now, not after
                # the linger, and can no longer write a response after the error.
                self.cycle.disconnected = True
                self.cycle.message_event.set()
        if not isinstance(error, RequestHeadTooLarge | RequestBodyTimeout) or not self.transport.can_write_eof():
            self.transport.close()  # a late head was read whole: nothing unread, no reset
            return
        self.transport.write_eof()
        self._linger.start(self.loop, self.transport.close)
        self.transport.resume_reading()
