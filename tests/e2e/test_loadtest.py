"""The deployment guide's load test, `k6 run load-tests/chat-stream-load.js`, short profile, against
a real bridge of two workers on one port (Redis shared, JWT per virtual user).

k6 exits non-zero when a threshold is missed: first token and time to first byte under 100 ms,
inter-token under 50 ms, no 5xx, under 1 % failed streams, checks over 99 %, and a burst that saw
429 with Retry-After. `make loadtest` runs the long profile (bench/loadtest.py).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import BridgeFactory, StubFactory, require_binary
from tests.support.processes import ROOT
from tests.support.redis import redis_factory, redis_server  # noqa: F401  (fixtures)
from tests.support.workers import two_workers

pytestmark = pytest.mark.redis

SCRIPT = ROOT / "load-tests" / "chat-stream-load.js"


def test_k6_short_profile_passes_its_thresholds_against_two_workers(
    stub_factory: StubFactory,
    bridge_factory: BridgeFactory,
    redis_server: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    k6 = require_binary("k6", str(Path(sys.executable).with_name("k6")))
    secret = secrets.token_hex(32)
    stub = stub_factory("--mode", "echo", "--token-delay-ms", "20")
    bridge = bridge_factory(stub, **two_workers(redis_server, JWT_SECRET=secret, AUTH_REQUIRED="true"))
    summary = tmp_path / "summary.json"
    done = subprocess.run(
        [k6, "run", "--quiet", "--no-color", "--summary-export", str(summary), str(SCRIPT)],
        env={**os.environ, "BASE_URL": bridge.url, "JWT_SECRET": secret, "PROFILE": "short"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, (done.stdout[-4000:], done.stderr[-4000:])
    metrics = json.loads(summary.read_text())["metrics"]
    assert metrics["rate_limited_with_retry_after"]["count"] == 5, "25 at once: the last 5 over 20/minute"
    assert metrics["stream_errors"]["value"] == 0
    assert metrics["disconnected_mid_answer"]["count"] > 0
    assert metrics["tokens_counted"]["count"] > 0
