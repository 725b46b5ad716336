"""Shared fixtures: real stub and bridge processes, each stopped at the end of the test."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from tests.support.processes import Bridge, Stub

StubFactory = Callable[..., Stub]
BridgeFactory = Callable[..., Bridge]


def require_binary(name: str, *candidates: str) -> str:
    """Path of a system binary a test needs. Missing: a skip locally, a failure when CI=true."""
    for candidate in (name, *candidates):
        found = shutil.which(candidate) or (
            candidate if os.path.isabs(candidate) and os.access(candidate, os.X_OK) else None
        )
        if found:
            return found
    missing_prerequisite(f"{name} is not installed (make test installs it with apt-get)")


def missing_prerequisite(message: str) -> NoReturn:
    """Something from outside a test needs (a binary, a package index) is not there: a skip
    locally, a failure when CI=true, where everything must be."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def stub_factory() -> Iterator[StubFactory]:
    started: list[Stub] = []

    def start(*args: str, **kwargs: object) -> Stub:
        stub = Stub(*args, **kwargs)  # type: ignore[arg-type]
        started.append(stub)
        return stub

    yield start
    for stub in started:
        stub.stop()


@pytest.fixture
def bridge_factory(tmp_path: Path) -> Iterator[BridgeFactory]:
    started: list[Bridge] = []

    def start(stub: Stub | None = None, /, **env: str) -> Bridge:
        full = {
            "ENABLE_SSE_STREAMING": "true",
            "AUDIT_DB": str(tmp_path / f"audit-{len(started)}.sqlite3"),
            "LOG_LEVEL": "WARNING",
            # A stream a test leaves in its resume window (with RESUME_STORE) holds the drain for
            # the whole grace: short, so the stop() below ends the bridge cleanly, not by SIGKILL.
            "SHUTDOWN_GRACE_S": "2",
        }
        if stub is not None:
            full["RAG_TARGET"] = stub.target
        full.update(env)
        bridge = Bridge(full)
        started.append(bridge)
        return bridge

    yield start
    for bridge in started:
        bridge.stop()


@pytest.fixture(scope="module")
def echo_stub() -> Iterator[Stub]:
    """An echo-mode stub shared by a module's tests (stateless, so sharing is safe)."""
    stub = Stub("--mode", "echo")
    yield stub
    stub.stop()
