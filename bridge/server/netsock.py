"""TCP options that let the kernel drop a client that vanished without a FIN.

A phone that loses its network sends nothing: no FIN, no RST. Without these options the bridge
only learns of it when a write blocks, i.e. after the kernel's send buffer filled and
``SEND_TIMEOUT_S`` passed, which at a slow token rate, while waiting for a first token or between
heartbeats can take many minutes (the retransmission limit, ``tcp_retries2``, is ~15 min) while
the RAG service keeps generating for nobody. With ``TCP_USER_TIMEOUT`` the kernel aborts a
connection whose sent data stays unacknowledged that long; keepalive probes make an idle
connection carry data to be acknowledged. The abort reaches the app as a disconnect, which
cancels upstream (or starts the resume window) like any other.

The options are set on the listening socket: Linux copies them to every accepted socket
(``inet_csk_clone_lock`` keeps the keepalive flag, the keepalive timings and the user timeout),
so no per-connection hook into the server is needed. ``tests/unit/server/test_netsock.py`` checks the copy.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

#: Unanswered keepalive probes before the kernel gives up when no user timeout is set.
KEEPALIVE_PROBES = 3


@dataclass(frozen=True, slots=True)
class HalfOpenDetection:
    """How soon a silent peer is dropped: ``user_timeout_s`` (0 = kernel default, ~15 min) and
    ``keepalive_s``, the idle time before the first probe and between probes (0 = no probes)."""

    user_timeout_s: float
    keepalive_s: int

    def apply(self, sock: socket.socket) -> None:
        """Set the options on ``sock`` (a listening socket passes them to accepted ones)."""
        if self.user_timeout_s > 0 and hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1, round(self.user_timeout_s * 1000)))
        if self.keepalive_s > 0:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for name, value in (
                ("TCP_KEEPIDLE", self.keepalive_s),
                ("TCP_KEEPINTVL", self.keepalive_s),
                ("TCP_KEEPCNT", KEEPALIVE_PROBES),
            ):
                option = getattr(socket, name, None)
                if option is not None:  # macOS names the idle time TCP_KEEPALIVE; Linux is the target
                    sock.setsockopt(socket.IPPROTO_TCP, option, value)
