"""Structured JSON logging: one object per line on stderr, and optionally combined/error files.

The files mirror the seed's logs/combined.log and logs/error.log so existing log shipping keeps
working. Fields: ``ts`` (UTC ISO 8601, ms), ``level``, ``logger``, ``message``, then every
``extra=`` field of the call, so stream ends can be queried by request or trace id.

Privacy: ``log_stream_end`` writes identifiers, outcome and timings only. Query text never goes in
a log line (``StreamResult`` does not carry it).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import MutableMapping
from datetime import UTC, datetime
from io import TextIOWrapper
from typing import IO, Any

from bridge.safefiles import SHARED_DIRECTORY, SHARED_READ, open_trusted
from bridge.types import StreamResult

STREAM_LOGGER = "bridge.streams"
_OURS = "_bali_zero_handler"  # marks handlers we installed, so reconfiguring replaces only them
# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """Formats a record as one compact JSON object; unknown value types become strings."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = record.stack_info
        return json.dumps(entry, default=str, ensure_ascii=False, separators=(",", ":"))


def _handler(handler: logging.Handler, level: int) -> logging.Handler:
    handler.setLevel(level)
    handler.setFormatter(JsonFormatter())
    setattr(handler, _OURS, True)
    return handler


class TrustedFileHandler(logging.FileHandler):
    """A FileHandler whose file is opened by ``bridge.safefiles`` rules, whenever it is (re)opened.

    A plain FileHandler follows a symlink at LOG_FILE (appending log lines to whatever it names,
    as root too) and appends to another user's file. Here a symlink, a file of another user, a
    second hard link or a directory others can write is refused (``UnsafeFile``); a log file of
    ours that others may write is tightened to at most 0644 (readable, for log shippers).
    """

    def _open(self) -> TextIOWrapper:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        fd = open_trusted(self.baseFilename, flags, perms=SHARED_READ, directory_mode=SHARED_DIRECTORY)
        return open(fd, "a", encoding=self.encoding, errors=self.errors)


def _file(path: str, level: int) -> logging.Handler:
    return _handler(TrustedFileHandler(path, encoding="utf-8"), level)


def configure_logging(settings: Any, stream: IO[str] | None = None) -> list[logging.Handler]:
    """Install JSON handlers on the root logger per ``settings``; return them (for closing/tests).

    Reads ``settings.log_level``, ``settings.log_file`` (combined, same level as stderr) and
    ``settings.error_log_file`` (ERROR and above). Calling it again replaces the handlers it
    installed before and leaves other handlers alone. ``stream`` defaults to ``sys.stderr``.
    """
    level = logging.getLevelName(settings.log_level.upper())
    if not isinstance(level, int):
        raise ValueError(f"LOG_LEVEL={settings.log_level!r}: not a logging level")
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _OURS, False)]:
        root.removeHandler(old)
        old.close()
    handlers = [_handler(logging.StreamHandler(stream or sys.stderr), level)]
    if settings.log_file:
        handlers.append(_file(settings.log_file, level))
    if settings.error_log_file:
        handlers.append(_file(settings.error_log_file, logging.ERROR))
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    return handlers


GRPC_LOG_VARIABLES = ("GRPC_VERBOSITY", "GRPC_TRACE")


def quiet_grpc_core_logs(environ: MutableMapping[str, str]) -> None:
    """Turn gRPC's C-core logging off (``GRPC_VERBOSITY=NONE``) unless the operator chose a verbosity
    or traces (either variable set and not empty): theirs is never overridden.

    The C core logs through absl, as plain text on stderr (``E1206 20:14:59.324843 5861
    chttp2_transport.cc:1435] ... GOAWAY ...``) in the middle of the bridge's JSON lines, which
    breaks a reader that parses one JSON object per line. What it reports about a call reaches the
    bridge's own log as that call's status details. It reads these variables once, when grpc is
    imported (set later, they change nothing), so the entry point calls this before any import of
    grpc; an ``--env-file`` is read too late for them.
    """
    if not any(environ.get(name, "").strip() for name in GRPC_LOG_VARIABLES):
        environ["GRPC_VERBOSITY"] = "NONE"


def stream_end_fields(result: StreamResult) -> dict[str, Any]:
    """The fields of a stream-end line: identifiers, outcome and timings, never content."""
    fields: dict[str, Any] = {
        "event": "stream_end",
        "stream_id": result.stream_id,
        "request_id": result.request_id,
        "trace_id": result.trace_id,
        "outcome": result.outcome,
        "tokens": result.tokens,
        "duration_ms": round(result.duration_ms, 3),
        "first_token_ms": None if result.first_token_ms is None else round(result.first_token_ms, 3),
        "error_code": result.error_code,
        "finish_reason": result.finish_reason,
    }
    return fields


def log_stream_end(result: StreamResult, logger: logging.Logger | None = None) -> None:
    """One line per ended stream; errors at WARNING (an upstream failure is not a bridge bug)."""
    level = logging.WARNING if result.outcome == "error" else logging.INFO
    (logger or logging.getLogger(STREAM_LOGGER)).log(level, "stream end", extra=stream_end_fields(result))
