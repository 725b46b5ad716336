"""The bridge's settings: one typed, immutable object built from the environment once.

No other module reads ``os.environ``; everything receives a ``Settings`` explicitly, so a test
can build two differently configured apps in one process.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from bridge.errors import ConfigError as ConfigError  # defined with every other error; Settings raises it
from bzb_shared.otel import TelemetryConfigError, check_telemetry_environ

T = TypeVar("T")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_RATE_RE = re.compile(r"^\s*(\d+)\s*(?:/|per)\s*(\d+)?\s*(second|minute|hour|day)s?\s*$", re.IGNORECASE)


DEFAULT_AUDIT_DB = "./data/audit.sqlite3"


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
    tcp_user_timeout_s: float = 20.0
    tcp_keepalive_s: int = 10
    upstream_timeout_s: float = 120.0
    upstream_connect_timeout_s: float = 5.0
    upstream_ejection_interval_s: float = 10.0
    upstream_keepalive_s: float = 330.0
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
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keepalive_timeout_s: float = 75.0
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
    audit_db: str = DEFAULT_AUDIT_DB
    audit_hash_key: str = ""
    audit_retention_days: int = 90
    audit_queue_size: int = 10_000
    audit_head_interval_s: float = 60.0
    log_level: str = "INFO"
    log_file: str = ""
    error_log_file: str = ""
    stats_window_s: float = 300.0
    otel: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Build settings from an environment mapping; raise ConfigError naming the bad variable.

        Everything is checked here, before the caller writes anything (the audit key file, log
        files): a typo must not leave a generated key behind next to a store it was never meant for.
        """
        values: dict[str, object] = {}
        for f in fields(cls):
            if f.name == "otel":
                continue
            raw = environ.get(f.name.upper())
            if raw is None:
                continue
            if raw.strip() == "":
                # Empty means "off" only where the default is off; `RAG_TARGET=` silently becoming
                # 127.0.0.1:50051 hid a deployment's missing value.
                if f.default not in ("", ()) and f.default is not MISSING:
                    raise ConfigError(
                        f"{f.name.upper()} is set but empty: unset it to use the default "
                        f"{_shown_default(f.default)}, or give a value"
                    )
                continue
            parser = _PARSERS.get(f.name, _PARSERS_BY_TYPE.get(str(f.type), str))
            try:
                values[f.name] = parser(raw.strip())
            except ValueError as exc:
                raise ConfigError(f"{f.name.upper()}={raw!r}: {exc}") from None
        values["otel"] = {k: v for k, v in environ.items() if k.startswith("OTEL_")}
        # Absolute from here on: the server and the `audit` commands name the same file in
        # messages, and a later chdir cannot move the store.
        values["audit_db"] = os.path.abspath(str(values.get("audit_db", DEFAULT_AUDIT_DB)))
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
            # The kernel takes milliseconds up to 2^31-1; above a day it no longer detects anything.
            (0 <= self.tcp_user_timeout_s <= 86_400, "TCP_USER_TIMEOUT_S must be within 0..86400 (0 = off)"),
            # TCP_KEEPIDLE/TCP_KEEPINTVL take whole seconds, at most 32767.
            (0 <= self.tcp_keepalive_s <= 32_767, "TCP_KEEPALIVE_S must be within 0..32767 (0 = off)"),
            (self.upstream_timeout_s > 0, "UPSTREAM_TIMEOUT_S must be > 0"),
            (self.upstream_ejection_interval_s > 0, "UPSTREAM_EJECTION_INTERVAL_S must be > 0"),
            # gRPC sends at most one ping a second, whatever its keepalive time says.
            (self.upstream_keepalive_s >= 1, "UPSTREAM_KEEPALIVE_S must be >= 1"),
            (self.shutdown_grace_s >= 0, "SHUTDOWN_GRACE_S must be >= 0"),
            (self.stream_window_frames >= 1, "STREAM_WINDOW_FRAMES must be >= 1"),
            (self.max_streams_per_user >= 1, "MAX_STREAMS_PER_USER must be >= 1"),
            (self.max_streams_total >= 1, "MAX_STREAMS_TOTAL must be >= 1"),
            (self.max_query_bytes >= 1, "MAX_QUERY_BYTES must be >= 1"),
            (self.max_body_bytes >= 1024, "MAX_BODY_BYTES must be >= 1024"),
            (self.max_header_bytes >= 4096, "MAX_HEADER_BYTES must be >= 4096"),
            (self.header_timeout_s > 0, "HEADER_TIMEOUT_S must be > 0"),
            (self.body_timeout_s > 0, "BODY_TIMEOUT_S must be > 0"),
            (self.keepalive_timeout_s > 0, "KEEPALIVE_TIMEOUT_S must be > 0"),
            (self.audit_retention_days >= 1, "AUDIT_RETENTION_DAYS must be >= 1"),
            (self.audit_queue_size >= 1, "AUDIT_QUEUE_SIZE must be >= 1"),
            (self.audit_head_interval_s > 0, "AUDIT_HEAD_INTERVAL_S must be > 0"),
            (self.resume_buffer_frames >= 1, "RESUME_BUFFER_FRAMES must be >= 1"),
            (self.resume_buffer_bytes >= 1024, "RESUME_BUFFER_BYTES must be >= 1024"),
            (
                self.log_level.upper() in {"DEBUG", "INFO", "WARNING", "ERROR"},
                "LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR",
            ),
            (
                sum(bool(x) for x in (self.jwt_secret, self.jwt_public_key_file, self.jwt_jwks_url)) <= 1,
                "set only one of JWT_SECRET, JWT_PUBLIC_KEY_FILE, JWT_JWKS_URL",
            ),
            (
                not self.auth_required or self.jwt_configured,
                "AUTH_REQUIRED=true needs one of JWT_SECRET, JWT_PUBLIC_KEY_FILE, JWT_JWKS_URL",
            ),
            (
                self.rate_limit_storage.split("://", 1)[0] in {"memory", "redis", "rediss"},
                "RATE_LIMIT_STORAGE must be memory:// or redis://host:port/db",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if self.jwt_public_key_file and not Path(self.jwt_public_key_file).is_file():
            raise ConfigError(f"JWT_PUBLIC_KEY_FILE={self.jwt_public_key_file!r}: no such file")
        parse_rate(self.rate_limit)
        for problem in self._value_problems():
            raise ConfigError(problem)

    def _value_problems(self) -> Iterator[str]:
        """Values whose shape only fails later (a URL parsed by a library, a path opened on start-up).

        One line per variable; add new settings' shape checks here.
        """
        yield from _problems("RAG_TARGET", self.rag_target, _rag_target_problem)
        yield from _problems("RESUME_STORE", self.resume_store, _redis_url_problem)
        if self.rate_limit_storage.split("://", 1)[0] != "memory":
            yield from _problems("RATE_LIMIT_STORAGE", self.rate_limit_storage, _redis_url_problem)
        yield from _problems("JWT_JWKS_URL", self.jwt_jwks_url, _http_url_problem)
        for origin in self.cors_origins:
            yield from _problems("CORS_ORIGINS", origin, _origin_problem)
        yield from _problems("AUDIT_DB", self.audit_db, _writable_file_problem)
        yield from _problems("AUDIT_HASH_KEY", self.audit_hash_key, key_material_problem)
        yield from _problems("LOG_FILE", self.log_file, _writable_file_problem)
        yield from _problems("ERROR_LOG_FILE", self.error_log_file, _writable_file_problem)
        try:
            check_telemetry_environ(self.otel)
        except TelemetryConfigError as exc:
            yield str(exc)

    def effective(self) -> list[tuple[str, str]]:
        """``(VARIABLE, value)`` for every setting as the bridge will use it, secrets masked.

        For `bali-zero-bridge config`: JWT_SECRET and AUDIT_HASH_KEY show only whether they are
        set; a password inside a URL (redis://:pw@host) becomes ``***``; OTLP headers often carry
        an API key and are hidden whole.
        """
        shown: list[tuple[str, str]] = []
        for f in fields(self):
            if f.name == "otel":
                continue
            value = getattr(self, f.name)
            name = f.name.upper()
            if name in SECRET_VARIABLES:
                text = "(set, hidden)" if value else ""
            elif isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, tuple):
                text = ",".join(str(v) for v in value)
            else:
                text = mask_url_password(str(value))
            shown.append((name, text))
        for name, value in sorted(self.otel.items()):
            shown.append((name, "(set, hidden)" if "HEADERS" in name else mask_url_password(value)))
        return shown

    @property
    def jwt_configured(self) -> bool:
        return bool(self.jwt_secret or self.jwt_public_key_file or self.jwt_jwks_url)

    @property
    def rate_limit_per_window(self) -> tuple[int, int]:
        """(requests, window seconds) of RATE_LIMIT."""
        return parse_rate(self.rate_limit)


def variables_help(width: int = 96) -> str:
    """The ``--help`` epilog: every variable by name, so nobody has to open the source to find them."""
    names = [f.name.upper() for f in fields(Settings) if f.name != "otel"] + ["OTEL_*"]
    lines = [
        "configuration: environment variables (or --env-file FILE; the real environment wins),",
        "validated at start-up; `bali-zero-bridge config` prints the effective values:",
    ]
    line = " "
    for name in names:
        if len(line) + len(name) + 1 > width:
            lines.append(line)
            line = " "
        line += f" {name}"
    lines.append(line)
    return "\n".join(lines)


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


def mask_url_password(value: str) -> str:
    """``redis://user:secret@host/0`` → ``redis://user:***@host/0``; anything else unchanged."""
    parts = urlsplit(value) if "://" in value else None
    if parts is None or parts.password is None:
        return value
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return parts._replace(netloc=f"{user}:***@{hostinfo}").geturl()


def _shown_default(default: object) -> str:
    if isinstance(default, bool):
        return "true" if default else "false"
    return repr(default) if isinstance(default, str) else str(default)


ProblemCheck = Callable[[str], "str | None"]


def _problems(variable: str, value: str, check: ProblemCheck) -> Iterator[str]:
    """``VARIABLE='value': why`` when a set value fails ``check`` (unset values are not checked)."""
    if value:
        problem = check(value)
        if problem:
            shown = "(hidden)" if variable in SECRET_VARIABLES else repr(value)
            yield f"{variable}={shown}: {problem}"


_HOST_PORT_RE = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")
_GRPC_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "xds:")


def _rag_target_problem(value: str) -> str | None:
    if value.startswith(_GRPC_SCHEMES):
        return None if value.split(":", 1)[1].strip("/") else "a target URI needs an address after the scheme"
    for part in value.split(","):
        match = _HOST_PORT_RE.match(part.strip())
        if not match or not 1 <= int(match.group(1)) <= 65535:
            return "expected host:port, a comma list h1:p1,h2:p2, or dns:///host:port"
    return None


def _redis_url_problem(value: str) -> str | None:
    parts = urlsplit(value)
    if parts.scheme == "unix":
        return None if parts.path else "a unix:// URL needs a socket path"
    if parts.scheme not in {"redis", "rediss"}:
        return "expected redis://host:port/db (or rediss://, unix://)"
    try:
        port = parts.port
    except ValueError:
        return "the port is not a number in 1..65535"
    if not parts.hostname:
        return "the URL names no host"
    if port == 0:
        return "the port is not a number in 1..65535"
    db = parts.path.strip("/")
    if db and not db.isdigit():
        return "the database after the host must be a number, e.g. /0"
    return None


def _http_url_problem(value: str) -> str | None:
    parts = urlsplit(value)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        return "expected an http:// or https:// URL"
    return None


def _origin_problem(value: str) -> str | None:
    if value == "*":
        return None
    parts = urlsplit(value)
    if parts.scheme not in {"http", "https"} or not parts.hostname or parts.path or parts.query:
        return f"{value!r} is not an origin such as https://app.example.com"
    return None


def _writable_file_problem(value: str) -> str | None:
    """A path the bridge will create or append to: not a directory, and no file where a folder must be."""
    path = Path(value)
    if path.is_dir():
        return "is a directory, expected a file path"
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else f"{parent} is not a directory"
    return None


_MIN_KEY_BYTES = 16


def key_material_problem(value: str) -> str | None:
    """Hex is decoded (so a key file's content pasted in is the same key); anything else is UTF-8."""
    if len(key_material(value)) < _MIN_KEY_BYTES:
        return f"must hold at least {_MIN_KEY_BYTES} bytes of key material"
    return None


def key_material(text: str) -> bytes:
    """The bytes of an AUDIT_HASH_KEY or key-file value."""
    text = text.strip()
    try:
        return bytes.fromhex(text)
    except ValueError:
        return text.encode()


SECRET_VARIABLES = frozenset({"JWT_SECRET", "AUDIT_HASH_KEY"})
"""Values never echoed in a message or by ``bali-zero-bridge config``."""


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
