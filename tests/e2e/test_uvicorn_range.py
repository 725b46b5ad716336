"""The header attacks against bridges running the lowest and the highest uvicorn the bridge allows.

pyproject.toml allows ``uvicorn[standard]>=0.35,<0.56`` (bridge/server/uvicorn_fence.py); the rest of the
suite runs the version constraints.txt pins. Here each end of the range is installed with pip
(``--no-deps --target``, cached under the gitignored build/uvicorn-range/), put first on a real
bridge's PYTHONPATH, and the attacks of tests/adversarial/test_request_head.py that go through the protocol's
coupling to uvicorn (its callbacks, timers, pipeline and flow control) are collected again in this
module, with a ``bridge_factory`` that starts such bridges; so is a body-deadline attack, whose 408
wakes the app through the request cycle's attributes. A release below the range is refused by
the CLI with one line and exit 2. No pip or no package index: a skip locally, a failure when CI=true.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from bridge.server.uvicorn_fence import FIRST_UNSUPPORTED, LOWEST_SUPPORTED, SUPPORTED_RANGE, minor_version
from tests.adversarial.test_request_body import test_chunked_body_or_trailers_trickled_get_408_at_body_timeout
from tests.adversarial.test_request_head import (
    test_200_slowloris_connections_are_closed_after_header_timeout_while_healthz_stays_fast,
    test_200mib_header_flood_is_cut_off_at_the_limit_without_buffering,
    test_chunked_body_then_endless_trailer_is_cut_off_at_the_header_limit,
    test_head_just_over_the_limit_gets_431_json_and_close,
    test_idle_keepalive_connection_is_closed_after_keepalive_timeout,
    test_keepalive_connection_stalled_mid_head_is_closed_after_header_timeout,
    test_silent_connection_is_closed_after_header_timeout,
    test_thousands_of_requests_pipelined_behind_a_stream_do_not_grow_memory,
)
from tests.conftest import BridgeFactory, missing_prerequisite
from tests.support.processes import ROOT, Bridge, Stub, base_env

# Collected again here, each once per end of the range (the bridge_factory below).
__all__ = [
    "test_200_slowloris_connections_are_closed_after_header_timeout_while_healthz_stays_fast",
    "test_200mib_header_flood_is_cut_off_at_the_limit_without_buffering",
    "test_chunked_body_or_trailers_trickled_get_408_at_body_timeout",
    "test_chunked_body_then_endless_trailer_is_cut_off_at_the_header_limit",
    "test_head_just_over_the_limit_gets_431_json_and_close",
    "test_idle_keepalive_connection_is_closed_after_keepalive_timeout",
    "test_keepalive_connection_stalled_mid_head_is_closed_after_header_timeout",
    "test_silent_connection_is_closed_after_header_timeout",
    "test_thousands_of_requests_pipelined_behind_a_stream_do_not_grow_memory",
]

LOWEST_RELEASE = "0.35.0"
HIGHEST_RELEASE = "0.55.0"  # the newest release of the highest supported minor version
BELOW_RANGE = "0.34.3"
CACHE = ROOT / "build" / "uvicorn-range"
# uvicorn alone: its dependencies are the venv's (both ends of the range accept those versions).
PIP_INSTALL = (
    sys.executable,
    "-m",
    "pip",
    "install",
    "--quiet",
    "--disable-pip-version-check",
    "--no-input",
    "--no-deps",
)


def installed_uvicorn(version: str) -> Path:
    """A directory holding exactly uvicorn ``version`` (its dependencies are the venv's), installed once."""
    target = CACHE / f"uvicorn-{version}"
    if target.is_dir():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    # Installed aside and renamed: an interrupted install never passes for a cached one.
    staging = Path(tempfile.mkdtemp(prefix=f".uvicorn-{version}-", dir=CACHE))
    try:
        done = subprocess.run(
            [*PIP_INSTALL, "--target", str(staging), f"uvicorn=={version}"],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if done.returncode != 0:
            reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
            missing_prerequisite(f"pip could not install uvicorn=={version}: {reason}")
        with contextlib.suppress(OSError):  # another run has just installed it
            staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def pythonpath(target: Path) -> str:
    """``target`` ahead of the venv's uvicorn, and this checkout's code ahead of the installed bridge."""
    return os.pathsep.join([str(target), str(ROOT)])


def imported_uvicorn(target: Path) -> tuple[str, Path]:
    """The version and location of the uvicorn a bridge started with ``pythonpath(target)`` imports."""
    shown = subprocess.run(
        [sys.executable, "-c", "import uvicorn\nprint(uvicorn.__version__)\nprint(uvicorn.__file__)"],
        env=base_env({"PYTHONPATH": pythonpath(target)}),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    version, location = shown.stdout.split()
    return version, Path(location)


@pytest.fixture(scope="module", params=[LOWEST_RELEASE, HIGHEST_RELEASE], ids=lambda v: f"uvicorn-{v}")
def bound_uvicorn(request: pytest.FixtureRequest) -> Path:
    version = str(request.param)
    target = installed_uvicorn(version)
    imported, location = imported_uvicorn(target)
    assert imported == version
    assert location.is_relative_to(target), location
    return target


@pytest.fixture
def bridge_factory(bridge_factory: BridgeFactory, bound_uvicorn: Path) -> BridgeFactory:
    """conftest's bridge_factory, each bridge importing the uvicorn of ``bound_uvicorn``."""

    def start(stub: Stub | None = None, /, **env: str) -> Bridge:
        return bridge_factory(stub, PYTHONPATH=pythonpath(bound_uvicorn), **env)

    return start


def test_the_releases_tested_are_the_ends_of_the_supported_range() -> None:
    """Widening the range in bridge/server/uvicorn_fence.py (and pyproject.toml) means testing the new end."""
    assert minor_version(LOWEST_RELEASE) == LOWEST_SUPPORTED
    assert minor_version(HIGHEST_RELEASE) == (FIRST_UNSUPPORTED[0], FIRST_UNSUPPORTED[1] - 1)
    below = minor_version(BELOW_RANGE)
    assert below is not None and below < LOWEST_SUPPORTED


def test_fence_unit_tests_pass_on_the_bound(bound_uvicorn: Path) -> None:
    """Every name the bridge uses exists there, and every uvicorn name its subclasses touch is fenced."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/unit/server/test_uvicorn_fence.py"],
        env=base_env({"PYTHONPATH": pythonpath(bound_uvicorn)}),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


def test_bridge_on_a_uvicorn_below_the_range_exits_2_with_one_line(tmp_path: Path) -> None:
    target = installed_uvicorn(BELOW_RANGE)
    assert imported_uvicorn(target)[0] == BELOW_RANGE
    done = subprocess.run(
        # An address this host does not have: binding it fails (exit 1), so a 2 means the check came first.
        [sys.executable, "-m", "bridge", "--host", "192.0.2.1", "--port", "0"],
        env=base_env({"PYTHONPATH": pythonpath(target), "AUDIT_DB": str(tmp_path / "audit.sqlite3")}),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert done.stderr == (
        f"bali-zero-bridge: cannot start: uvicorn {BELOW_RANGE} is not supported (supported: "
        f"uvicorn{SUPPORTED_RANGE}): outside the supported range; install a supported one: "
        f"pip install 'uvicorn[standard]{SUPPORTED_RANGE}'\n"
    )
