"""`rag-stub`: run the stub RAG gRPC server until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

from rag_stub.server import StubConfig, start_server


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, StubConfig]:
    p = argparse.ArgumentParser(prog="rag-stub", description="Deterministic stub of the bali_zero.rag.v1 service")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051, help="0 picks a free port")
    p.add_argument("--mode", choices=("rag", "echo"), default="rag")
    p.add_argument("--first-token-delay-ms", type=float, default=0.0)
    p.add_argument("--token-delay-ms", type=float, default=0.0)
    p.add_argument("--fail-after", type=int, default=None, help="abort with UNAVAILABLE after N tokens")
    p.add_argument(
        "--status-delay-ms",
        type=float,
        default=0.0,
        help="wait this long between the completion message and the OK status (late trailers)",
    )
    p.add_argument("--repeat", type=int, default=1, help="echo mode: stream the query N times")
    p.add_argument(
        "--echo-delimiter",
        default=None,
        help="echo mode: split the query at this string (dropping it) instead of into words",
    )
    p.add_argument("--max-query-bytes", type=int, default=8 * 1024)
    p.add_argument("--shutdown-grace-s", type=float, default=5.0)
    p.add_argument(
        "--min-ping-interval-s",
        type=float,
        default=300.0,
        help="keepalive policy: a client ping sooner than this after the previous one, while the server sent "
        "no data, is a strike, and the third gets GOAWAY too_many_pings (gRPC's default policy: 300)",
    )
    args = p.parse_args(argv)
    if args.repeat < 1 or (args.fail_after is not None and args.fail_after < 0):
        p.error("--repeat must be >= 1 and --fail-after >= 0")
    if args.min_ping_interval_s < 0:
        p.error("--min-ping-interval-s must be >= 0")
    config = StubConfig(
        mode=args.mode,
        first_token_delay_ms=args.first_token_delay_ms,
        token_delay_ms=args.token_delay_ms,
        fail_after=args.fail_after,
        status_delay_ms=args.status_delay_ms,
        repeat=args.repeat,
        echo_delimiter=args.echo_delimiter,
        max_query_bytes=args.max_query_bytes,
        min_ping_interval_s=args.min_ping_interval_s,
    )
    return args, config


async def _serve(args: argparse.Namespace, config: StubConfig) -> None:
    from rag_stub.telemetry import server_interceptors

    server, port = await start_server(config, args.host, args.port, interceptors=server_interceptors(os.environ))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"rag-stub listening on {args.host}:{port}", flush=True)
    await stop.wait()
    # Running streams get a grace period, then are cancelled (and logged as such).
    await server.stop(args.shutdown_grace_s)


def main(argv: list[str] | None = None) -> int:
    args, config = parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard]
        pass
    try:
        asyncio.run(_serve(args, config))
    except OSError as exc:
        print(f"rag-stub: {exc} (choose another with --port)", file=sys.stderr)
        return 1
    return 0
