"""The bridge's settings: one typed, immutable object built from the environment once.

No other module reads ``os.environ``; everything receives a ``Settings`` explicitly, so a test
can build two differently configured apps in one process.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_RATE_RE = re.compile(r"^\s*(\d+)\s*(?:/|per)\s*(\d+)?\s*(second|minute|hour|day)s?\s*$", re.IGNORECASE)


class ConfigError(ValueError):
    """A setting has a value the bridge cannot run with; the message names the variable."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Every knob of the bridge. Field names are the lower-case environment variable names."""

    rag_target: str = "127.0.0.1:50051"
    enable_sse_streaming: bool = False
    sse_rollout_percent: float = 100.0
    heartbeat_interval_s: float = 30.0
    resume_grace_s: float = 0.0
    resume_buffer_frames: int = 10_000
    resume_buffer_bytes: int = 4 * 1024 * 1024
    resume_store: str = ""
    send_timeout_s: float = 30.0
    upstream_timeout_s: float = 120.0
    upstream_connect_timeout_s: float = 5.0
    upstream_ejection_interval_s: float = 10.0
    shutdown_grace_s: float = 20.0
    stream_window_frames: int = 64
    rate_limit: str = "20/minute"
    rate_limit_storage: str = "memory://"
    rate_limit_fail_open: bool = True
    max_streams_per_user: int = 3
    max_streams_total: int = 2000
    max_query_bytes: int = 8 * 1024
    max_body_bytes: int = 64 * 1024
    max_header_bytes: int = 32 * 1024
    max_history_messages: int = 50
    auth_required: bool = False
    jwt_secret: str = ""
    jwt_public_key_file: str = ""
    jwt_jwks_url: str = ""
    jwt_audience: str = ""
    jwt_issuer: str = ""
    jwt_leeway_s: float = 30.0
    trusted_proxies: tuple[IPNetwork, ...] = ()
    cors_origins: tuple[str, ...] = ()
    audit_db: str = "./data/audit.sqlite3"
    audit_hash_key: str = ""
    audit_retention_days: int = 90
    audit_queue_size: int = 10_000
    log_level: str = "INFO"
    log_file: str = ""
    error_log_file: str = ""
    stats_window_s: float = 300.0
    otel: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Build settings from an environment mapping; raise ConfigError naming the bad variable."""
        values: dict[str, object] = {}
        for f in fields(cls):
            if f.name == "otel":
                continue
            raw = environ.get(f.name.upper())
            if raw is None or raw.strip() == "":
                continue
            parser = _PARSERS.get(f.name, _PARSERS_BY_TYPE.get(str(f.type), str))
            try:
                values[f.name] = parser(raw.strip())
            except ValueError as exc:
                raise ConfigError(f"{f.name.upper()}={raw!r}: {exc}") from None
        values["otel"] = {k: v for k, v in environ.items() if k.startswith("OTEL_")}
        settings = cls(**values)  # type: ignore[arg-type]
        settings.validate()
        return settings

    def validate(self) -> None:
        """Reject combinations that would misbehave at run time rather than at start-up."""
        checks: list[tuple[bool, str]] = [
            (0.0 <= self.sse_rollout_percent <= 100.0, "SSE_ROLLOUT_PERCENT must be within 0..100"),
            (self.heartbeat_interval_s > 0, "HEARTBEAT_INTERVAL_S must be > 0"),
            (self.resume_grace_s >= 0, "RESUME_GRACE_S must be >= 0"),
            (self.send_timeout_s > 0, "SEND_TIMEOUT_S must be > 0"),
            (self.upstream_timeout_s > 0, "UPSTREAM_TIMEOUT_S must be > 0"),
            (self.upstream_ejection_interval_s > 0, "UPSTREAM_EJECTION_INTERVAL_S must be > 0"),
            (self.shutdown_grace_s >= 0, "SHUTDOWN_GRACE_S must be >= 0"),
            (self.stream_window_frames >= 1, "STREAM_WINDOW_FRAMES must be >= 1"),
            (self.max_streams_per_user >= 1, "MAX_STREAMS_PER_USER must be >= 1"),
            (self.max_streams_total >= 1, "MAX_STREAMS_TOTAL must be >= 1"),
            (self.max_query_bytes >= 1, "MAX_QUERY_BYTES must be >= 1"),
            (self.max_body_bytes >= 1024, "MAX_BODY_BYTES must be >= 1024"),
            (self.max_header_bytes >= 4096, "MAX_HEADER_BYTES must be >= 4096"),
            (self.audit_retention_days >= 1, "AUDIT_RETENTION_DAYS must be >= 1"),
            (self.audit_queue_size >= 1, "AUDIT_QUEUE_SIZE must be >= 1"),
            (self.resume_buffer_frames >= 1, "RESUME_BUFFER_FRAMES must be >= 1"),
            (self.resume_buffer_bytes >= 1024, "RESUME_BUFFER_BYTES must be >= 1024"),
            (self.log_level.upper() in {"DEBUG", "INFO", "WARNING", "ERROR"}, "LOG_LEVEL must be one of "
             "DEBUG, INFO, WARNING, ERROR"),
            (sum(bool(x) for x in (self.jwt_secret, self.jwt_public_key_file, self.jwt_jwks_url)) <= 1,
             "set only one of JWT_SECRET, JWT_PUBLIC_KEY_FILE, JWT_JWKS_URL"),
            (not self.auth_required or self.jwt_configured,
             "AUTH_REQUIRED=true needs one of JWT_SECRET, JWT_PUBLIC_KEY_FILE, JWT_JWKS_URL"),
            (self.rate_limit_storage.split("://", 1)[0] in {"memory", "redis", "rediss"},
             "RATE_LIMIT_STORAGE must be memory:// or redis://host:port/db"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if self.jwt_public_key_file and not Path(self.jwt_public_key_file).is_file():
            raise ConfigError(f"JWT_PUBLIC_KEY_FILE={self.jwt_public_key_file!r}: no such file")
        parse_rate(self.rate_limit)

    @property
    def jwt_configured(self) -> bool:
        return bool(self.jwt_secret or self.jwt_public_key_file or self.jwt_jwks_url)

    @property
    def rate_limit_per_window(self) -> tuple[int, int]:
        """(requests, window seconds) of RATE_LIMIT."""
        return parse_rate(self.rate_limit)


def parse_rate(text: str) -> tuple[int, int]:
    """Parse ``"20/minute"`` or ``"100 per 10 seconds"`` into (count, seconds)."""
    match = _RATE_RE.match(text)
    if not match:
        raise ConfigError(f"RATE_LIMIT={text!r}: expected COUNT/UNIT such as 20/minute")
    count = int(match.group(1))
    multiple = int(match.group(2) or 1)
    unit = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}[match.group(3).lower()]
    if count < 1 or multiple < 1:
        raise ConfigError(f"RATE_LIMIT={text!r}: count and window must be >= 1")
    return count, multiple * unit


def _bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError("expected true or false")


def _float(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value):
        raise ValueError("expected a finite number")
    return value


def _networks(raw: str) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in raw.split(",") if part.strip())


def _csv(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _int(raw: str) -> int:
    return int(raw.replace("_", ""))


_PARSERS_BY_TYPE: dict[str, Callable[[str], object]] = {"bool": _bool, "float": _float, "int": _int, "str": str}
_PARSERS: dict[str, Callable[[str], object]] = {"trusted_proxies": _networks, "cors_origins": _csv}
