"""``bali-zero-bridge doctor`` against a hostile server (tests/support/hostile_http.py).

The doctor is pointed at URLs its user does not control. Whatever the server does (endless or
compressed-bomb bodies, a ``Content-Length`` of 10^11 on an error, a byte per half second in the
headers, the body or the TLS handshake, headers that never end, endless ``100 Continue``, frames
nested past the stack, control characters meant for the terminal) the doctor must end within
its deadline, hold a bounded amount of memory, and say what happened in one line, with exit
status 1 or 2 and no traceback. Each run is a real doctor process; its peak RSS is its own
VmHWM, its wall time includes the interpreter's start.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.hostile_http import HostileProcess
from tests.support.nginx import self_signed_cert
from tests.support.processes import ROOT, base_env
from tests.support.stream_rss import vm_rss_kib

TIMEOUT_S = 2.0  # --timeout-s: each request's deadline
MAX_IDLE_S = 2.0  # --max-idle-s
# The doctor's documented bound (--max-idle-s + four times --timeout-s), plus the interpreter's start on a
# loaded machine; a doctor still running at KILL_AFTER_S is killed and the test fails.
WALL_LIMIT_S = MAX_IDLE_S + 4 * TIMEOUT_S + 5.0
KILL_AFTER_S = 40.0
RSS_KILL_MIB = 512.0
# Above the RSS of a doctor that fails at once: the caps allow a few hundred KiB of body, one
# network read and the frames parsed from it.
RSS_GROWTH_LIMIT_MIB = 16.0
LINE_PREFIXES = ("ok ", "PROBLEM ", "ERROR ", "skipped ")


@dataclass
class DoctorRun:
    code: int
    lines: list[str]
    stdout: str
    stderr: str
    peak_rss_mib: float
    wall_s: float


DoctorAgainst = Callable[..., DoctorRun]

# ``python -m bridge`` that writes its own /proc/self/status to argv[1] as it exits: VmHWM is this
# process's peak RSS. (A child's ru_maxrss from wait4 would also count the test runner's pages
# the child had between fork and exec.)
PEAK_PROBE = """
import atexit, runpy, sys
status_path = sys.argv.pop(1)
def keep_status():
    with open("/proc/self/status", encoding="ascii") as status, open(status_path, "w", encoding="ascii") as out:
        out.write(status.read())
atexit.register(keep_status)
sys.argv[0] = "bridge"
runpy.run_module("bridge", run_name="__main__", alter_sys=True)
"""


def _rss_mib(pid: int) -> float:
    """0 once the process has exited (a zombie has no VmRSS)."""
    try:
        return vm_rss_kib(pid) / 1024
    except (OSError, RuntimeError):
        return 0.0


def run_doctor(*args: str) -> DoctorRun:
    """One doctor process: its exit status, output, wall time and peak RSS (VmHWM).

    A doctor still running after KILL_AFTER_S, or above RSS_KILL_MIB, is killed and the test fails
    (unbounded, it took GiBs within seconds: the machine is shared).
    """
    with tempfile.TemporaryDirectory() as scratch:
        status_path = Path(scratch) / "status"
        started = time.monotonic()
        process = subprocess.Popen(
            [sys.executable, "-c", PEAK_PROBE, str(status_path), "doctor", *args],
            cwd=ROOT,
            env=base_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
        )
        killed = ""
        while True:
            try:
                stdout, stderr = process.communicate(timeout=0.05)
                break
            except subprocess.TimeoutExpired:
                rss_mib = _rss_mib(process.pid)
                if not killed and (rss_mib > RSS_KILL_MIB or time.monotonic() - started > KILL_AFTER_S):
                    killed = f"killed after {time.monotonic() - started:.1f} s at {rss_mib:.0f} MiB RSS"
                    process.kill()
        wall = time.monotonic() - started
        if killed:
            pytest.fail(f"the doctor was {killed}: {stdout[-500:]} {stderr[-500:]}")
        status = status_path.read_text(encoding="ascii") if status_path.exists() else ""
    peak = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    assert peak, f"no VmHWM: the doctor died without exiting (exit {process.returncode}) {stderr[-2000:]}"
    return DoctorRun(process.returncode, stdout.splitlines(), stdout, stderr, int(peak.group(1)) / 1024, wall)


@pytest.fixture(scope="module")
def baseline_rss_mib() -> float:
    """The doctor's peak RSS when it fails before reading anything (nothing listens on port 9)."""
    run = run_doctor("http://127.0.0.1:9/", "--timeout-s", str(TIMEOUT_S))
    assert run.code == 2 and run.lines[0].startswith("ERROR cannot read"), run
    return run.peak_rss_mib


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed_cert(tmp_path_factory.mktemp("hostile-tls"))


@pytest.fixture
def doctor_against(cert: tuple[Path, Path], baseline_rss_mib: float) -> Iterator[DoctorAgainst]:
    """Runs the doctor against a fresh hostile server in ``mode``; checks what every run must show."""
    servers: list[HostileProcess] = []

    def run(mode: str, *, tls: bool = False, origin: bool = False) -> DoctorRun:
        server = HostileProcess(mode, *cert) if tls else HostileProcess(mode)
        servers.append(server)
        args = [server.url, "--timeout-s", str(TIMEOUT_S), "--max-idle-s", str(MAX_IDLE_S)]
        args += ["--cacert", str(cert[0])] if tls else []
        args += ["--origin", "https://app.example"] if origin else []
        result = run_doctor(*args)
        figures = f"{mode}: exit {result.code}, peak RSS {result.peak_rss_mib:.1f} MiB, {result.wall_s:.1f} s"
        print(figures, f"(baseline {baseline_rss_mib:.1f} MiB)", result.lines)
        assert result.code in (1, 2), f"{figures} {result.stdout[-500:]} {result.stderr[-2000:]}"
        assert result.stderr == "", result.stderr[-2000:]  # no traceback, no warning
        assert result.wall_s < WALL_LIMIT_S, figures
        assert result.peak_rss_mib - baseline_rss_mib < RSS_GROWTH_LIMIT_MIB, figures
        assert result.lines and all(line.startswith(LINE_PREFIXES) for line in result.lines), result.lines
        assert all(line.isprintable() for line in result.lines), result.lines
        if result.code == 2:
            assert len(result.lines) == 1, result.lines
        return result

    yield run
    for server in servers:
        server.kill()


ENDLESS_BODIES = {
    "error-huge-length": "answered HTTP 500 (xxxx",
    "endless-comments": "sent more than 262144 bytes",
    "endless-line": "sent more than 262144 bytes",
    "endless-frames": "sent more than 262144 bytes",
    "gzip-bomb": "sent more than 262144 bytes",
    "undeclared-encoding": "Content-Encoding 'br', which the doctor did not offer",
    "huge-headers": "cannot read",
    "switching-protocols": "cannot read",
}


@pytest.mark.parametrize("mode", list(ENDLESS_BODIES))
def test_endless_huge_or_compressed_bomb_responses_cost_the_doctor_bounded_memory(
    doctor_against: DoctorAgainst, mode: str
) -> None:
    """A 500 promising 10^11 bytes and sending MiB blocks used to be read whole before it was cut
    (GiBs of RSS within seconds); a KiB of gzip inflated a whole network read at once."""
    result = doctor_against(mode)
    assert result.code == 2 and ENDLESS_BODIES[mode] in result.lines[0], result.lines


TRICKLES = {
    "trickle-headers": "the diagnostic stream: no complete response head",
    "endless-informational": "the diagnostic stream: no complete response head",
    "trickle-body": f"the diagnostic stream was still open {TIMEOUT_S:g} s after the request",
    "error-trickle": "answered HTTP 503 (overloaded",
    "preflight-trickle": "the CORS preflight: no complete response head",
    "idle-stream-trickle": f"the idle check's stream was still open {MAX_IDLE_S + TIMEOUT_S:g} s",
    "tls-trickle": "the diagnostic stream: no complete response head",
    "alpn-trickle": f"TLS handshake with 127.0.0.1 did not finish within {TIMEOUT_S:g} s",
}


@pytest.mark.parametrize("mode", list(TRICKLES))
def test_a_server_trickling_a_byte_at_a_time_cannot_hold_the_doctor_past_its_deadline(
    doctor_against: DoctorAgainst, mode: str
) -> None:
    """httpx's timeouts apply per network read, so a byte every half second never trips them:
    the doctor waited for headers, error bodies and TLS records until killed."""
    result = doctor_against(mode, tls=mode.startswith(("tls", "alpn")), origin=mode.startswith("preflight"))
    assert result.code == 2 and TRICKLES[mode] in result.lines[0], result.lines


def test_an_endless_preflight_body_is_never_read(doctor_against: DoctorAgainst) -> None:
    result = doctor_against("preflight-endless", origin=True)
    assert result.code == 1 and any(line.startswith("PROBLEM cors") for line in result.lines), result.lines


def test_a_redirect_to_another_host_is_reported_not_followed(doctor_against: DoctorAgainst) -> None:
    """Following it would take the checks (and --token) to a host the user did not name."""
    result = doctor_against("redirect-endless")
    assert result.code == 2 and "HTTP 302 redirecting to http://evil.example/steal" in result.lines[0], result.lines
    assert "does not follow redirects" in result.lines[0]


def test_an_error_body_cannot_forge_doctor_lines_or_send_terminal_escapes(doctor_against: DoctorAgainst) -> None:
    result = doctor_against("error-forged-lines")
    assert result.code == 2 and len(result.lines) == 1, result.lines
    assert "\x1b" not in result.stdout and "\u202e" not in result.stdout
    assert r"\x1b[2J" in result.lines[0] and r"\nPROBLEM forged" in result.lines[0]


def test_a_frame_nested_past_the_stack_is_a_diagnosis_not_a_traceback(doctor_against: DoctorAgainst) -> None:
    result = doctor_against("deeply-nested-json")
    assert result.code == 2 and "sent no diagnostic frame" in result.lines[0], result.lines


def test_a_nan_heartbeat_header_does_not_become_a_deadline(doctor_against: DoctorAgainst) -> None:
    """``X-Heartbeat-Interval: nan`` counts as absent (30 s), so the idle check is skipped here."""
    result = doctor_against("nan-heartbeat")
    assert result.code == 1 and any(line.startswith("skipped read-timeout") for line in result.lines), result.lines
