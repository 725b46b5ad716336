"""The first-token path's write pattern, counted by the client's kernel (Linux ``TCP_INFO``).

The status line and the frames held when a stream opens leave in one write (bridge/headwrite.py).
As two writes they were two packets, each waking the reader, before its first frame; latency
figures on a shared 2-core host are too noisy to catch that coming back, a segment count is not.
"""

from __future__ import annotations

import socket
import struct
import sys

import pytest

from tests.conftest import BridgeFactory, StubFactory

# struct tcp_info (linux/tcp.h): tcpi_data_segs_in, segments carrying data received (Linux >= 4.6).
_DATA_SEGS_IN = struct.Struct("=I")
_DATA_SEGS_IN_OFFSET = 152


def data_segments_in(sock: socket.socket) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    assert len(info) >= _DATA_SEGS_IN_OFFSET + 4, "kernel without tcpi_data_segs_in"
    return int(_DATA_SEGS_IN.unpack_from(info, _DATA_SEGS_IN_OFFSET)[0])


@pytest.mark.skipif(sys.platform != "linux", reason="TCP_INFO layout is Linux's")
def test_status_line_and_first_frame_arrive_in_one_segment(
    stub_factory: StubFactory, bridge_factory: BridgeFactory
) -> None:
    # The metadata frame goes out with the status, the first token 500 ms later, so no later
    # frame can join the first segment and the count is exact.
    stub = stub_factory("--mode", "echo", "--first-token-delay-ms", "500")
    bridge = bridge_factory(stub)
    with socket.create_connection(("127.0.0.1", bridge.port), timeout=10) as sock:
        sock.sendall(
            b"GET /api/v2/bali-zero/chat-stream?query=one+segment HTTP/1.1\r\n"
            b"host: 127.0.0.1\r\naccept: text/event-stream\r\n\r\n"
        )
        received = b""
        while b'"type":"metadata"' not in received or not received.endswith(b"\n\n\r\n"):
            chunk = sock.recv(65536)
            assert chunk, received
            received += chunk
        segments = data_segments_in(sock)
    assert received.startswith(b"HTTP/1.1 200 "), received
    assert b'"type":"token"' not in received, received
    assert segments == 1, f"status line and first frame came in {segments} segments"
