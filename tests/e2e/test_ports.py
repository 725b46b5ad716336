"""A port already in use is refused loudly: by rag-stub itself, and by `make run` before it starts anything."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import StubFactory, require_binary
from tests.support.processes import ROOT, base_env, free_port


@pytest.fixture
def listening_socket() -> Iterator[int]:
    """A loopback port some other program is listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_second_stub_on_a_taken_port_refuses_instead_of_sharing_it(stub_factory: StubFactory) -> None:
    """grpc's default SO_REUSEPORT let a second stub print "listening" on the first one's port."""
    first = stub_factory()
    second = subprocess.run(
        [sys.executable, "-m", "rag_stub", "--port", str(first.port)],
        cwd=ROOT,
        env=base_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert second.returncode == 1
    assert "listening" not in second.stdout
    last_line = second.stderr.strip().splitlines()[-1]
    assert last_line.startswith("rag-stub: cannot listen on 127.0.0.1:") and str(first.port) in last_line
    assert "--port" in last_line and "Traceback" not in second.stderr


def _run_sh(stub_port: int, bridge_port: int, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """run.sh in its own process group, so whatever it started is stopped even when it hangs."""
    proc = subprocess.Popen(
        ["bash", str(ROOT / "scripts" / "run.sh")],
        cwd=tmp_path,
        env=base_env(
            {
                "BIN": str(Path(sys.executable).parent),
                "PYTHONPATH": str(ROOT),
                "STUB_PORT": str(stub_port),
                "BRIDGE_PORT": str(bridge_port),
            }
        ),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_make_run_names_the_taken_bridge_port_and_starts_nothing(listening_socket: int, tmp_path: Path) -> None:
    """It used to print the "Demo page" banner of whatever already answered /healthz there."""
    require_binary("curl")
    result = _run_sh(free_port(), listening_socket, tmp_path)
    assert result.returncode == 1
    assert "Demo page" not in result.stdout
    assert f"port {listening_socket} (BRIDGE_PORT) is already in use" in result.stderr
    assert "BRIDGE_PORT=" in result.stderr and "STUB_PORT=" in result.stderr  # how to choose others
    assert not (tmp_path / "data").exists()  # nothing was started


def test_make_run_names_the_taken_stub_port(listening_socket: int, tmp_path: Path) -> None:
    require_binary("curl")
    result = _run_sh(listening_socket, free_port(), tmp_path)
    assert result.returncode == 1
    assert f"port {listening_socket} (STUB_PORT) is already in use" in result.stderr
    assert "Demo page" not in result.stdout
