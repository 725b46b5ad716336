"""JSON logs: one object per line on the stream, combined file, and errors split into their own file."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from bridge.config import Settings
from bridge.grpc_logs import quiet_grpc_core_logs
from bridge.logs import configure_logging, log_stream_end
from bridge.types import StreamResult
from tests.support.processes import ROOT


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


def lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_json_lines_level_and_file_split(tmp_path: Path) -> None:
    settings = replace(
        Settings(),
        log_level="INFO",
        log_file=str(tmp_path / "logs" / "combined.log"),
        error_log_file=str(tmp_path / "logs" / "error.log"),
    )
    stream = io.StringIO()
    handlers = configure_logging(settings, stream=stream)
    log = logging.getLogger("bridge.test")
    log.debug("hidden")
    log.info("hello %s", "world", extra={"request_id": "r-1"})
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("it failed")
    for handler in handlers:
        handler.flush()

    out = lines(stream.getvalue())
    assert [e["message"] for e in out] == ["hello world", "it failed"]
    assert out[0]["level"] == "INFO" and out[0]["logger"] == "bridge.test" and out[0]["request_id"] == "r-1"
    assert str(out[0]["ts"]).endswith("+00:00")
    assert "RuntimeError: boom" in str(out[1]["exc"])
    combined = lines((tmp_path / "logs" / "combined.log").read_text())
    errors = lines((tmp_path / "logs" / "error.log").read_text())
    assert [e["message"] for e in combined] == ["hello world", "it failed"]
    assert [e["message"] for e in errors] == ["it failed"]


def test_reconfiguring_replaces_only_our_handlers() -> None:
    first, second = io.StringIO(), io.StringIO()
    foreign = logging.NullHandler()
    logging.getLogger().addHandler(foreign)
    configure_logging(Settings(), stream=first)
    configure_logging(replace(Settings(), log_level="WARNING"), stream=second)
    logging.getLogger("x").warning("once")
    assert first.getvalue() == "" and len(lines(second.getvalue())) == 1
    assert foreign in logging.getLogger().handlers


def test_stream_end_line_has_ids_and_timings_but_no_text() -> None:
    stream = io.StringIO()
    configure_logging(Settings(), stream=stream)
    secret = "my passport number is X123"
    result = StreamResult(
        "s-1",
        "r-1",
        "error",
        4,
        1234.5678,
        88.1,
        error_code="upstream_unavailable",
        finish_reason=None,
        trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
    )
    log_stream_end(result)
    (entry,) = lines(stream.getvalue())
    assert entry["level"] == "WARNING" and entry["event"] == "stream_end"
    assert entry["request_id"] == "r-1" and entry["stream_id"] == "s-1"
    assert entry["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert entry["outcome"] == "error" and entry["error_code"] == "upstream_unavailable"
    assert entry["tokens"] == 4 and entry["duration_ms"] == 1234.568 and entry["first_token_ms"] == 88.1
    assert secret not in stream.getvalue()


@pytest.mark.parametrize(
    ("environ", "verbosity"),
    [
        ({}, "NONE"),
        ({"GRPC_VERBOSITY": " "}, "NONE"),
        ({"GRPC_VERBOSITY": "error"}, "error"),  # the operator's choice is kept
        ({"GRPC_TRACE": "http_keepalive"}, None),  # traces asked for: gRPC's own default shows them
    ],
)
def test_grpc_core_logs_are_off_unless_the_operator_chose(environ: dict[str, str], verbosity: str | None) -> None:
    quiet_grpc_core_logs(environ)
    assert environ.get("GRPC_VERBOSITY") == verbosity


# Records GRPC_VERBOSITY at the moment grpc is first imported: the C core reads it then, once.
_AT_GRPC_IMPORT = """
import os, sys
class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "grpc":
            print(os.environ.get("GRPC_VERBOSITY"))
        return None
sys.meta_path.insert(0, Spy())
import bridge.cli
"""


def test_the_entry_point_sets_the_grpc_log_default_before_grpc_is_imported() -> None:
    environ = {k: v for k, v in os.environ.items() if k not in ("GRPC_VERBOSITY", "GRPC_TRACE")}
    done = subprocess.run(
        [sys.executable, "-c", _AT_GRPC_IMPORT], capture_output=True, text=True, env=environ, cwd=ROOT, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["NONE"]
