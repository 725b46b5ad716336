"""Half-open clients: a peer that vanished without a FIN is dropped and its upstream cancelled.

The client runs in its own network namespace behind a veth pair; its link is then black-holed
(every packet it sends is dropped, ACKs included), as when a phone loses its network. One bridge
runs with TCP_USER_TIMEOUT_S/TCP_KEEPALIVE_S, one with both off (the kernel defaults, i.e. the
bridge before the feature), side by side, so one test measures both times to cancel.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.netns import VethLink, veth_link
from tests.support.processes import ROOT, Bridge, Stub, base_env

USER_TIMEOUT_S = 3.0
KEEPALIVE_S = 1
# Scheduling on a loaded 2-core machine, the stub's next token write, the log line's trip.
MARGIN_S = 4.0
# How long the feature-off bridge is watched: enough to show it does not notice, short enough
# to keep the test quick (it would hold on for ~15 min of TCP retransmissions, tcp_retries2).
BASELINE_WATCH_S = 20.0


class _Reader:
    """tests/support/stream_reader.py inside the namespace, its stdout lines collected."""

    def __init__(self, link: VethLink, port: int, request_id: str) -> None:
        argv = link.exec_argv(
            [
                sys.executable,
                "-m",
                "tests.support.stream_reader",
                link.host_ip,
                str(port),
                request_id,
                "--lifetime-s",
                "90",
            ]
        )
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        self._first_token = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if line.startswith("first-token"):
                self._first_token.set()
        self._first_token.set()

    def wait_first_token(self, timeout: float = 15) -> None:
        assert self._first_token.wait(timeout) and "first-token" in self.lines, self.lines

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@contextmanager
def _readers(link: VethLink, *targets: tuple[int, str]) -> Iterator[list[_Reader]]:
    started: list[_Reader] = []
    try:
        for port, request_id in targets:
            started.append(_Reader(link, port, request_id))
        yield started
    finally:
        for reader in started:
            reader.stop()


def _cancel_time(stub: Stub, request_id: str, since: float, timeout: float) -> tuple[float | None, str]:
    """Seconds from ``since`` until the stub logged the stream's end (None: not within timeout)."""
    try:
        end = stub.wait_for_end(request_id, timeout=max(0.0, since + timeout - time.monotonic()))
    except TimeoutError:
        return None, "running"
    return time.monotonic() - since, str(end["outcome"])


def test_blackholed_client_is_dropped_and_upstream_cancelled_within_tcp_user_timeout(tmp_path: Path) -> None:
    with veth_link() as link:
        stub = Stub("--mode", "echo", "--token-delay-ms", "250", "--repeat", "2000")
        bridges: list[Bridge] = []
        try:
            common = {
                "ENABLE_SSE_STREAMING": "true",
                "RAG_TARGET": stub.target,
                "LOG_LEVEL": "WARNING",
                "AUDIT_DB": str(tmp_path / "audit.sqlite3"),
                "SEND_TIMEOUT_S": "30",
            }
            detecting = Bridge(
                {**common, "TCP_USER_TIMEOUT_S": str(USER_TIMEOUT_S), "TCP_KEEPALIVE_S": str(KEEPALIVE_S)},
                "--host",
                link.host_ip,
            )
            bridges.append(detecting)
            baseline = Bridge({**common, "TCP_USER_TIMEOUT_S": "0", "TCP_KEEPALIVE_S": "0"}, "--host", link.host_ip)
            bridges.append(baseline)
            on_id, off_id = f"halfopen-on-{uuid.uuid4().hex[:8]}", f"halfopen-off-{uuid.uuid4().hex[:8]}"
            with _readers(link, (detecting.port, on_id), (baseline.port, off_id)) as readers:
                for reader in readers:
                    reader.wait_first_token()
                qdisc = link.blackhole()
                blackholed = time.monotonic()
                on_s, on_outcome = _cancel_time(stub, on_id, blackholed, USER_TIMEOUT_S + MARGIN_S)
                off_s, off_outcome = _cancel_time(stub, off_id, blackholed, BASELINE_WATCH_S)
                print(
                    f"\nhalf-open client ({qdisc}): TCP_USER_TIMEOUT_S={USER_TIMEOUT_S:g} "
                    f"TCP_KEEPALIVE_S={KEEPALIVE_S}: upstream {on_outcome} after "
                    f"{'-' if on_s is None else f'{on_s:.1f}'} s; feature off: "
                    f"{off_outcome if off_s is None else off_outcome + f' after {off_s:.1f} s'}"
                    f"{f' (still running after {BASELINE_WATCH_S:g} s)' if off_s is None else ''}"
                )
                assert on_outcome == "cancelled" and on_s is not None, detecting.output()
                assert on_s <= USER_TIMEOUT_S + MARGIN_S
                # Without the options nothing notices a silent peer at this token rate.
                assert off_s is None, f"baseline stream ended after {off_s} s as {off_outcome}"
            for bridge in bridges:
                assert not any("Traceback" in line for line in bridge.stderr_lines), bridge.output()
        finally:
            for bridge in bridges:
                bridge.stop()
            stub.stop()
