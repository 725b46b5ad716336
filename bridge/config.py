"""The bridge's settings: one typed, immutable object built from the environment once.

No other module reads ``os.environ``; everything receives a ``Settings`` explicitly, so a test
can build two differently configured apps in one process.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import textwrap
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from bridge.errors import ConfigError as ConfigError  # defined with every other error; Settings raises it
from bzb_shared.otel import TelemetryConfigError, check_telemetry_environ

T = TypeVar("T")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# An id a client may send as ``model`` and the bridge echoes in every chunk.
_MODEL_ID = re.compile(r"[A-Za-z0-9._:\-]{1,64}")
_RATE_RE = re.compile(r"^\s*(\d+)\s*(?:/|per)\s*(\d+)?\s*(second|minute|hour|day)s?\s*$", re.IGNORECASE)


DEFAULT_AUDIT_DB = "./data/audit.sqlite3"
MAX_WORKERS = 64

RangeCheck = Callable[[Any], "str | None"]
"""A parsed value's problem ("must be > 0"), or None."""
ProblemCheck = Callable[[str], "str | None"]
"""A set text value's problem ("expected host:port"), or None."""


def _at_least(bound: float) -> RangeCheck:
    return lambda value: None if value >= bound else f"must be >= {bound:g}"


def _above(bound: float) -> RangeCheck:
    return lambda value: None if value > bound else f"must be > {bound:g}"


def _within(low: float, high: float, note: str = "") -> RangeCheck:
    return lambda value: None if low <= value <= high else f"must be within {low:g}..{high:g}{note}"


def setting(
    default: Any,
    help: str,
    *,
    check: RangeCheck | None = None,
    shape: ProblemCheck | None = None,
    parse: Callable[[str], object] | None = None,
    secret: bool = False,
    default_text: str | None = None,
) -> Any:
    """Declare one setting: its default, what it means and how a value is checked.

    Everything else about a setting (parsing, validation, ``--help``, ``bali-zero-bridge config``
    and the configuration table in the docs) is derived from this one declaration, so a new
    setting cannot be documented in one place and forgotten in another.
    """
    spec = Spec(help, check, shape, parse, secret, default_text)
    return field(default=default, metadata={"spec": spec})


@dataclass(frozen=True, slots=True)
class Spec:
    """What the declaration of one setting says beyond its type and default."""

    help: str
    check: RangeCheck | None = None  # a parsed value out of range -> "NAME must be ..."
    shape: ProblemCheck | None = None  # a set text value of the wrong form -> "NAME='value': why"
    parse: Callable[[str], object] | None = None  # when the field's type alone does not say how
    secret: bool = False  # never echoed in a message or by `bali-zero-bridge config`
    default_text: str | None = None  # how the docs show the default, when the value alone misleads


@dataclass(frozen=True, slots=True)
class Settings:
    """Every knob of the bridge. Field names are the lower-case environment variable names."""

    rag_target: str = setting(
        "127.0.0.1:50051",
        "gRPC target; `dns:///host:port` or a comma list `h1:p1,h2:p2` balance round robin with health checks",
        shape=lambda value: _rag_target_problem(value),
    )
    enable_sse_streaming: bool = setting(
        False, "the stream endpoint answers 404 `STREAMING_DISABLED` while false (`/chat` always works)"
    )
    sse_rollout_percent: float = setting(
        100.0,
        "sticky share of callers (hash of the identity key: token user, proxy id or IP) that get streaming, 0-100",
        check=_within(0, 100),
    )
    openai_models: tuple[str, ...] = setting(
        ("bali-zero",),
        "comma list of the model ids `GET /v1/models` lists and `POST /v1/chat/completions` accepts "
        "(every one is the same RAG service)",
        parse=lambda raw: _csv(raw),
        shape=lambda value: None if _MODEL_ID.fullmatch(value) else "a model id is 1-64 of A-Z a-z 0-9 . _ : -",
        default_text="`bali-zero`",
    )
    heartbeat_interval_s: float = setting(30.0, "seconds of silence before a heartbeat frame", check=_above(0))
    resume_grace_s: float = setting(
        0.0,
        "how long a dropped stream is kept for resume before upstream is cancelled (0 = no resume)",
        check=_at_least(0),
    )
    resume_buffer_frames: int = setting(10_000, "replay buffer cap per stream, in frames", check=_at_least(1))
    resume_buffer_bytes: int = setting(4 * 1024 * 1024, "replay buffer cap per stream, in bytes", check=_at_least(1024))
    resume_store: str = setting(
        "",
        "`redis://host:port/db` shares resume state across instances",
        shape=lambda value: _redis_url_problem(value),
    )
    send_timeout_s: float = setting(
        30.0, "a blocked send this long ends the stream and cancels upstream", check=_above(0)
    )
    tcp_user_timeout_s: float = setting(
        20.0,
        "a client whose connection leaves data unacknowledged this long is dropped (0 = kernel default, ~15 min)",
        # The kernel takes milliseconds up to 2^31-1; above a day it no longer detects anything.
        check=_within(0, 86_400, " (0 = off)"),
    )
    tcp_keepalive_s: int = setting(
        10,
        "idle seconds before (and between) TCP keepalive probes, so a silent stream is probed too (0 = off)",
        # TCP_KEEPIDLE/TCP_KEEPINTVL take whole seconds, at most 32767.
        check=_within(0, 32_767, " (0 = off)"),
    )
    upstream_timeout_s: float = setting(120.0, "gRPC deadline of one answer", check=_above(0))
    upstream_connect_timeout_s: float = setting(
        5.0,
        "longest wait for the RAG service's first message before streaming starts (capped by `HEARTBEAT_INTERVAL_S`)",
    )
    upstream_ejection_interval_s: float = setting(
        10.0, "outlier-detection interval: a replica failing most calls is ejected for 30 s", check=_above(0)
    )
    upstream_keepalive_s: float = setting(
        330.0,
        "how often, at most, a keepalive ping goes on a connection to the RAG service, only while a call is open; "
        "must be at least the RAG server's minimum ping interval (gRPC's default: 300 s) or it answers GOAWAY "
        "`too_many_pings`",
        # gRPC sends at most one ping a second, whatever its keepalive time says.
        check=_at_least(1),
    )
    shutdown_grace_s: float = setting(20.0, "how long running streams may finish after SIGTERM", check=_at_least(0))
    stream_window_frames: int = setting(
        64, "frames buffered per stream before the bridge stops reading gRPC", check=_at_least(1)
    )
    rate_limit: str = setting(
        "20/minute",
        "per user (or per IP for anonymous callers), both chat endpoints; `COUNT/UNIT` or `COUNT per N UNITs`",
        shape=lambda value: _rate_problem(value),
    )
    rate_limit_storage: str = setting(
        "memory://",
        "`redis://host:port/db` shares the limit across instances",
        shape=lambda value: _rate_storage_problem(value),
    )
    rate_limit_fail_open: bool = setting(True, "Redis unreachable: allow (logged, counted) or answer 503")
    auth_failure_rate_limit: str = setting(
        "30/minute",
        "refused credentials one client address (IPv6: its /64) may send per window; past it 429 "
        "`TOO_MANY_AUTH_FAILURES` instead of 401 (only failures count)",
        shape=lambda value: _rate_problem(value),
    )
    control_rate_limit: str = setting(
        "600/minute",
        "resumes, stream cancels and admin audit reads per caller (anonymous: per address or IPv6 /64), "
        "apart from `RATE_LIMIT`; raise it with `MAX_STREAMS_PER_USER`",
        shape=lambda value: _rate_problem(value),
    )
    max_streams_per_user: int = setting(
        3, "concurrent streams per user or IP (429 `TOO_MANY_STREAMS`)", check=_at_least(1)
    )
    max_streams_total: int = setting(2000, "concurrent streams per instance (503 `OVERLOADED`)", check=_at_least(1))
    max_query_bytes: int = setting(8 * 1024, "longest query, in UTF-8 bytes", check=_at_least(1))
    max_body_bytes: int = setting(64 * 1024, "largest POST body", check=_at_least(1024))
    max_header_bytes: int = setting(
        32 * 1024,
        "largest URL + headers of a request (431); the connection cuts a head off at this + 2 KiB as it "
        "arrives, a chunked body's trailers included",
        check=_at_least(4096),
    )
    header_timeout_s: float = setting(
        10.0,
        "a request head must arrive within this time from its first byte (or from connect); slower: 408 and close",
        check=_above(0),
    )
    body_timeout_s: float = setting(
        30.0,
        "the whole request body (a chunked body's trailers included) must arrive within this time from the end "
        "of the head; slower: 408 `BODY_TIMEOUT` and close (raise it with `MAX_BODY_BYTES`)",
        check=_above(0),
    )
    keepalive_timeout_s: float = setting(
        75.0,
        "an idle keep-alive connection is closed after this long "
        "(keep it above nginx's upstream `keepalive_timeout`, 60 s)",
        check=_above(0),
    )
    max_history_messages: int = setting(50, "longest conversation history")
    auth_required: bool = setting(
        False, "requests without a valid JWT get 401 (needs one of the three `JWT_*` key settings)"
    )
    jwt_secret: str = setting(
        "", "HS256 secret (set only one of `JWT_SECRET`, `JWT_PUBLIC_KEY_FILE`, `JWT_JWKS_URL`)", secret=True
    )
    jwt_public_key_file: str = setting("", "RS256 public key, PEM file")
    jwt_jwks_url: str = setting("", "JWKS URL (http or https)", shape=lambda value: _http_url_problem(value))
    jwt_audience: str = setting("", "`aud` required to match when set")
    jwt_issuer: str = setting("", "`iss` required to match when set")
    jwt_leeway_s: float = setting(30.0, "clock skew allowed on `exp`, `nbf`, `iat`")
    trusted_proxies: tuple[IPNetwork, ...] = setting(
        (), "comma list of CIDRs whose `X-Forwarded-For` and `x-user-id` are believed", parse=lambda raw: _networks(raw)
    )
    cors_origins: tuple[str, ...] = setting(
        (),
        "comma list of allowed origins (no CORS headers when empty)",
        parse=lambda raw: _csv(raw),
        shape=lambda value: _origin_problem(value),
    )
    audit_db: str = setting(
        DEFAULT_AUDIT_DB,
        "audit store (SQLite, WAL); made absolute at start-up",
        shape=lambda value: _writable_file_problem(value),
    )
    audit_hash_key: str = setting(
        "",
        "key for query HMACs and the hash chain, at least 16 bytes (hex is decoded)",
        shape=lambda value: key_material_problem(value),
        secret=True,
        default_text="generated into `<AUDIT_DB>.key` (0600)",
    )
    audit_retention_days: int = setting(
        90, "older audit records are purged (hourly and at start-up)", check=_at_least(1)
    )
    audit_queue_size: int = setting(
        10_000, "audit events waiting for the writer; beyond it they are dropped and counted", check=_at_least(1)
    )
    audit_refusal_window_s: float = setting(
        60.0,
        "`auth_failed` and `rate_limited` records are folded per client, reason and window: at most 2 records "
        "per client and reason per window",
        check=_within(1, 86_400),
    )
    audit_head_interval_s: float = setting(
        60.0,
        "how often a moved audit chain head is signed into the log and `<AUDIT_DB>.head` (also at start and shutdown)",
        check=_above(0),
    )
    log_level: str = setting(
        "INFO",
        "`DEBUG`, `INFO`, `WARNING` or `ERROR`; above `INFO` the signed audit heads are not logged",
        shape=lambda value: (
            None
            if value.upper() in {"DEBUG", "INFO", "WARNING", "ERROR"}
            else "must be one of DEBUG, INFO, WARNING, ERROR"
        ),
    )
    log_file: str = setting(
        "", "a file receiving every JSON log line, besides stderr", shape=lambda value: _writable_file_problem(value)
    )
    error_log_file: str = setting(
        "", "a file receiving the errors only", shape=lambda value: _writable_file_problem(value)
    )
    stats_window_s: float = setting(300.0, "sliding window of the stats endpoint")
    workers: int = setting(
        1,
        "server processes accepting on one port (`auto` = the CPUs this process may use); above 1 needs "
        "`RATE_LIMIT_STORAGE` (and with `RESUME_GRACE_S` > 0 `RESUME_STORE`) on Redis, so limits, caps, resume "
        "and stops are shared (`--workers` overrides it)",
        check=_within(1, MAX_WORKERS),
        parse=lambda raw: parse_workers(raw),
    )
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
            parser = _spec(f).parse or _PARSERS_BY_TYPE.get(str(f.type), str)
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
        """Reject values and combinations that would misbehave at run time rather than at start-up."""
        for problem in self.problems():
            raise ConfigError(problem)

    def problems(self) -> Iterator[str]:
        """One line per bad value, naming its variable: each setting's own check, then combinations."""
        for f in fields(self):
            if f.name == "otel":
                continue
            spec, value, name = _spec(f), getattr(self, f.name), f.name.upper()
            if spec.check is not None and (problem := spec.check(value)):
                yield f"{name} {problem}"
            if spec.shape is not None:
                for item in value if isinstance(value, tuple) else (value,):
                    if item and (problem := spec.shape(item)):
                        shown = "(hidden)" if spec.secret else repr(item)
                        yield f"{name}={shown}: {problem}"
        if sum(bool(x) for x in (self.jwt_secret, self.jwt_public_key_file, self.jwt_jwks_url)) > 1:
            yield "set only one of JWT_SECRET, JWT_PUBLIC_KEY_FILE, JWT_JWKS_URL"
        if not self.openai_models:
            yield "OPENAI_MODELS must name at least one model id"
        if self.auth_required and not self.jwt_configured:
            yield "AUTH_REQUIRED=true needs one of JWT_SECRET, JWT_PUBLIC_KEY_FILE, JWT_JWKS_URL"
        if self.jwt_public_key_file and not Path(self.jwt_public_key_file).is_file():
            yield f"JWT_PUBLIC_KEY_FILE={self.jwt_public_key_file!r}: no such file"
        if problem := self.shared_state_problem():
            yield problem
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
            if _spec(f).secret:
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

    def shared_state_problem(self) -> str | None:
        """Why these settings cannot run ``workers`` processes, or None.

        Every worker is a process of its own: with the rate limit, the stream caps or resume state
        in process memory, each worker would grant its own budget (a 20/minute limit becoming
        20 x WORKERS) and a reconnect landing on another worker would find nothing. Refused at
        start-up rather than served with silently per-worker limits.
        """
        if self.workers <= 1:
            return None
        missing = []
        if not self.rate_limit_storage.startswith(("redis://", "rediss://")):
            missing.append("RATE_LIMIT_STORAGE")
        if self.resume_grace_s > 0 and not self.resume_store:
            missing.append("RESUME_STORE")
        if not missing:
            return None
        both = " (one Redis can serve both)" if len(missing) > 1 else ""
        return (
            f"WORKERS={self.workers} needs state shared by all workers: set {' and '.join(missing)} to "
            f"redis://HOST:PORT/DB{both}, or run one worker"
        )

    @property
    def jwt_configured(self) -> bool:
        return bool(self.jwt_secret or self.jwt_public_key_file or self.jwt_jwks_url)

    @property
    def rate_limit_per_window(self) -> tuple[int, int]:
        """(requests, window seconds) of RATE_LIMIT."""
        return parse_rate(self.rate_limit)

    @property
    def auth_failure_rate_per_window(self) -> tuple[int, int]:
        """(refused credentials, window seconds) of AUTH_FAILURE_RATE_LIMIT, per client address."""
        return parse_rate(self.auth_failure_rate_limit, "AUTH_FAILURE_RATE_LIMIT")

    @property
    def control_rate_per_window(self) -> tuple[int, int]:
        """(requests, window seconds) of CONTROL_RATE_LIMIT: resumes, cancels and admin reads per caller."""
        return parse_rate(self.control_rate_limit, "CONTROL_RATE_LIMIT")


def variables_help(width: int = 100) -> str:
    """The ``--help`` epilog: every variable with its default and meaning, from its declaration."""
    lines = [
        "configuration: environment variables (or --env-file FILE; the real environment wins),",
        "validated at start-up; `bali-zero-bridge config` prints the effective values:",
    ]
    for f in fields(Settings):
        if f.name == "otel":
            continue
        text = f"{f.name.upper()} [{_documented_default(f)}]: {_spec(f).help}".replace("`", "")
        lines += textwrap.wrap(
            text,
            width,
            initial_indent="  ",
            subsequent_indent="      ",
        )
    lines.append("  OTEL_*: the standard OpenTelemetry variables")
    return "\n".join(lines)


def parse_workers(raw: str) -> int:
    """``WORKERS`` / ``--workers``: a whole number, or ``auto`` for the CPUs this process may use."""
    if raw.strip().lower() == "auto":
        return usable_cpus()
    return _int(raw)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, so a container's cpuset counts)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity API on this platform
        return max(1, os.cpu_count() or 1)


def _rate_problem(value: str) -> str | None:
    try:
        parse_rate(value)
    except ConfigError as exc:
        return str(exc).partition(": ")[2]
    return None


def _rate_storage_problem(value: str) -> str | None:
    scheme = value.split("://", 1)[0]
    if scheme == "memory":
        return None
    if scheme not in {"redis", "rediss"}:
        return "must be memory:// or redis://host:port/db"
    return _redis_url_problem(value)


def _documented_default(f: Field[Any]) -> str:
    spec = _spec(f)
    if spec.default_text is not None:
        return spec.default_text
    if f.default in ("", ()):
        return "unset"
    return _shown_default(f.default).strip("'")


def reference_table() -> str:
    """The configuration table of the docs, as Markdown: one row per setting, from its declaration."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for f in fields(Settings):
        if f.name == "otel":
            continue
        default = _documented_default(f)
        shown = default if _spec(f).default_text or default == "unset" else f"`{default}`"
        rows.append(f"| `{f.name.upper()}` | {shown} | {_spec(f).help} |")
    rows.append(
        "| `OTEL_*` | unset | standard OpenTelemetry variables (`OTEL_TRACES_EXPORTER=otlp` or `console`, "
        "`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_SERVICE_NAME`, `OTEL_TRACES_SAMPLER`, `OTEL_BSP_*`…); "
        "checked at start-up like the rest |"
    )
    return "\n".join(rows) + "\n"


def parse_rate(text: str, variable: str = "RATE_LIMIT") -> tuple[int, int]:
    """Parse ``"20/minute"`` or ``"100 per 10 seconds"`` into (count, seconds); errors name ``variable``."""
    match = _RATE_RE.match(text)
    if not match:
        raise ConfigError(f"{variable}={text!r}: expected COUNT/UNIT such as 20/minute")
    count = int(match.group(1))
    multiple = int(match.group(2) or 1)
    unit = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}[match.group(3).lower()]
    if count < 1 or multiple < 1:
        raise ConfigError(f"{variable}={text!r}: count and window must be >= 1")
    return count, multiple * unit


def mask_url_password(value: str) -> str:
    """``redis://user:secret@host/0`` → ``redis://user:***@host/0``; anything else unchanged."""
    parts = urlsplit(value) if "://" in value else None
    if parts is None or parts.password is None:
        return value
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return parts._replace(netloc=f"{user}:***@{hostinfo}").geturl()


def _spec(f: Field[Any]) -> Spec:
    return f.metadata["spec"]  # type: ignore[no-any-return]


def _shown_default(default: object) -> str:
    if isinstance(default, bool):
        return "true" if default else "false"
    if isinstance(default, float):
        return f"{default:g}"
    return repr(default) if isinstance(default, str) else str(default)


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
