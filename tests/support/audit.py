"""A bridge's audit store read back as an operator reads it: ``bali-zero-bridge audit …``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

from tests.support.processes import ROOT, base_env

END_TYPES = ("stream_completed", "stream_cancelled", "stream_failed")


def audit_cli(db: Path, *args: str, stdout: int | IO[str] = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    """``python -m bridge audit ARGS`` with AUDIT_DB=db, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "bridge", "audit", *args],
        env=base_env({"AUDIT_DB": str(db)}),
        cwd=ROOT,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
        check=False,
    )


def exported(db: Path) -> list[dict[str, Any]]:
    """Every record of the store at ``db``, oldest first (run once the bridge has exited)."""
    result = audit_cli(db, "export")
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def unended(records: list[dict[str, Any]]) -> set[str]:
    """Request ids of the streams with a ``stream_started`` record but no end record."""
    started = {r["request_id"] for r in records if r["event_type"] == "stream_started"}
    return started - {r["request_id"] for r in records if r["event_type"] in END_TYPES}
