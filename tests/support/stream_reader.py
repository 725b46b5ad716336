"""A minimal SSE reader run as its own process (inside a network namespace in test_half_open.py).

It opens one stream over a plain socket, prints ``first-token`` when the first token frame
arrives, then keeps reading quietly, like a phone on a page. It stops by itself after
``--lifetime-s`` so a namespace'd client never outlives its test.

    python -m tests.support.stream_reader HOST PORT REQUEST_ID [--lifetime-s N]
"""

from __future__ import annotations

import argparse
import socket
import time
import urllib.parse


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("request_id")
    parser.add_argument("--query", default="a b c d")
    parser.add_argument("--lifetime-s", type=float, default=120.0)
    args = parser.parse_args()
    deadline = time.monotonic() + args.lifetime_s
    path = "/api/v2/bali-zero/chat-stream?" + urllib.parse.urlencode({"query": args.query})
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {args.host}\r\nAccept: text/event-stream\r\n"
        f"X-Request-ID: {args.request_id}\r\n\r\n"
    )
    with socket.create_connection((args.host, args.port), timeout=10) as sock:
        sock.sendall(request.encode())
        seen = b""
        announced = False
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(min(left, 1.0))
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as exc:
                print(f"closed: {exc}", flush=True)
                return 0
            if not chunk:
                print("closed: eof", flush=True)
                return 0
            if not announced:
                seen = (seen + chunk)[-4096:]
                if b'"type":"token"' in seen:
                    print("first-token", flush=True)
                    announced = True
    print("lifetime over", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
