"""Start-up validation: every bad setting stops the bridge with exit 2 and one line naming the
variable, before anything is written to disk (the audit key file used to be generated first)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bridge.config import Settings
from bridge.errors import ConfigError
from tests.support.processes import ROOT, base_env

BAD_SETTINGS: list[tuple[str, str]] = [
    ("JWT_JWKS_URL", "notaurl"),
    ("RAG_TARGET", ""),
    ("RAG_TARGET", "localhost"),
    ("RAG_TARGET", "127.0.0.1:99999"),
    ("RESUME_STORE", "http://x"),
    ("RESUME_STORE", "redis://host:port/0"),
    ("RATE_LIMIT_STORAGE", "redis:///0"),
    ("RATE_LIMIT_STORAGE", "sqlite://x"),
    ("RATE_LIMIT", "lots"),
    ("AUTH_FAILURE_RATE_LIMIT", "0/minute"),
    ("CONTROL_RATE_LIMIT", "many"),
    ("AUDIT_REFUSAL_WINDOW_S", "0"),
    ("HEARTBEAT_INTERVAL_S", ""),
    ("HEARTBEAT_INTERVAL_S", "-1"),
    ("MAX_STREAMS_PER_USER", "three"),
    ("ENABLE_SSE_STREAMING", "maybe"),
    ("CORS_ORIGINS", "example.com"),
    ("TRUSTED_PROXIES", "10.0.0.0/33"),
    ("AUDIT_HASH_KEY", "short"),
    ("AUDIT_DB", "/dev/null/audit.sqlite3"),
    ("LOG_LEVEL", "LOUD"),
    ("OTEL_TRACES_SAMPLER", "sometimes"),
    ("OTEL_TRACES_EXPORTER", "zipkin"),
]


def _start(cwd: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bridge", "--port", "0"],
        cwd=cwd,
        env=base_env({"PYTHONPATH": str(ROOT), **env}),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_every_bad_setting_exits_2_naming_the_variable_and_writes_nothing(tmp_path: Path) -> None:
    """All cases start at once (each is a short-lived process) and each gets its own empty cwd, so
    the default ``./data/audit.sqlite3`` and its generated key would show up there if written."""
    runs = []
    for number, (variable, value) in enumerate(BAD_SETTINGS):
        cwd = tmp_path / f"case-{number}"
        cwd.mkdir()
        runs.append((variable, value, cwd, _start(cwd, {variable: value})))
    try:
        for variable, value, cwd, proc in runs:
            out, err = proc.communicate(timeout=60)
            lines = err.strip().splitlines()
            assert proc.returncode == 2, (variable, value, out, err)
            assert len(lines) == 1 and variable in lines[0], (variable, value, err)
            assert "Traceback" not in err and "listening" not in out
            assert list(cwd.iterdir()) == [], (variable, value, list(cwd.rglob("*")))
    finally:  # a bridge that accepted a bad value would otherwise keep serving after the test
        for *_, proc in runs:
            proc.kill()
            proc.wait()


def test_bad_setting_with_audit_db_elsewhere_creates_no_key_file(tmp_path: Path) -> None:
    """The issue's case: JWKS URL typo with AUDIT_DB set; no ``.key`` may appear beside the store."""
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    proc = _start(tmp_path, {"JWT_JWKS_URL": "notaurl", "AUDIT_DB": str(store_dir / "audit.sqlite3")})
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 2
    assert "JWT_JWKS_URL" in err
    assert list(store_dir.iterdir()) == []


@pytest.mark.parametrize(("variable", "value"), BAD_SETTINGS)
def test_from_env_rejects(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        Settings.from_env({variable: value})


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("RAG_TARGET", "dns:///rag.internal:50051"),
        ("RAG_TARGET", "10.0.0.1:50051, 10.0.0.2:50051"),
        ("RAG_TARGET", "[::1]:50051"),
        ("RESUME_STORE", "redis://:secret@127.0.0.1:6379/2"),
        ("RATE_LIMIT_STORAGE", "rediss://cache.internal:6380"),
        ("JWT_JWKS_URL", "https://id.example.com/.well-known/jwks.json"),
        ("CORS_ORIGINS", "https://app.example.com, http://localhost:3000"),
        ("JWT_SECRET", ""),  # empty where the default is "off" means off
        ("TRUSTED_PROXIES", ""),
    ],
)
def test_from_env_accepts(variable: str, value: str) -> None:
    Settings.from_env({variable: value})


def test_secret_values_are_not_echoed() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"AUDIT_HASH_KEY": "tiny-secret"})
    assert "tiny-secret" not in str(caught.value)


def test_a_store_that_cannot_be_created_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    """A well-formed AUDIT_DB on a file system that refuses new files (here /proc) fails at start-up."""
    proc = _start(tmp_path, {"AUDIT_DB": "/proc/bzb-audit.sqlite3"})
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 1
    assert err.strip().splitlines() == [err.strip()] and err.startswith("bali-zero-bridge: cannot start:")
    assert "Traceback" not in err and "listening" not in out


def test_every_setting_is_declared_once_with_its_meaning() -> None:
    """A field added without ``setting(...)`` would have no help, no check and no docs row."""
    from dataclasses import fields

    from bridge.config import reference_table, variables_help

    names = [f.name.upper() for f in fields(Settings) if f.name != "otel"]
    table, shown = reference_table(), variables_help()
    for f in fields(Settings):
        if f.name == "otel":
            continue
        assert f.metadata["spec"].help.strip(), f.name
    for name in names:
        assert f"| `{name}` |" in table, name
        assert f"  {name} [" in shown, name


@pytest.mark.parametrize(
    ("environ", "problem"),
    [
        ({"SSE_ROLLOUT_PERCENT": "101"}, "SSE_ROLLOUT_PERCENT must be within 0..100"),
        ({"TCP_KEEPALIVE_S": "40000"}, "TCP_KEEPALIVE_S must be within 0..32767 (0 = off)"),
        ({"MAX_HEADER_BYTES": "100"}, "MAX_HEADER_BYTES must be >= 4096"),
        ({"LOG_LEVEL": "loud"}, "LOG_LEVEL='loud': must be one of DEBUG, INFO, WARNING, ERROR"),
        ({"RATE_LIMIT": "lots"}, "RATE_LIMIT='lots': expected COUNT/UNIT such as 20/minute"),
        ({"RATE_LIMIT_STORAGE": "sqlite://x"}, "RATE_LIMIT_STORAGE='sqlite://x': must be memory:// or redis://"),
        ({"AUDIT_HASH_KEY": "short"}, "AUDIT_HASH_KEY=(hidden): must hold at least 16 bytes of key material"),
        ({"CORS_ORIGINS": "https://ok.example,nope"}, "CORS_ORIGINS='nope': 'nope' is not an origin"),
    ],
)
def test_each_declared_check_names_its_variable_in_one_line(environ: dict[str, str], problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(environ)
    assert str(caught.value).startswith(problem)


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"HEARTBEAT_INTERVAL_S": "0"}, "HEARTBEAT_INTERVAL_S"),
        ({"HEARTBEAT_INTERVAL_S": "nan"}, "HEARTBEAT_INTERVAL_S"),
        ({"SSE_ROLLOUT_PERCENT": "101"}, "SSE_ROLLOUT_PERCENT"),
        ({"ENABLE_SSE_STREAMING": "maybe"}, "ENABLE_SSE_STREAMING"),
        ({"MAX_STREAMS_TOTAL": "0"}, "MAX_STREAMS_TOTAL"),
        ({"RESUME_BUFFER_BYTES": "10"}, "RESUME_BUFFER_BYTES"),
        ({"RATE_LIMIT": "lots"}, "RATE_LIMIT"),
        ({"RATE_LIMIT_STORAGE": "mysql://x"}, "RATE_LIMIT_STORAGE"),
        ({"AUTH_REQUIRED": "true"}, "AUTH_REQUIRED"),
        ({"JWT_SECRET": "a", "JWT_JWKS_URL": "https://x"}, "JWT_SECRET"),
        ({"TRUSTED_PROXIES": "not-a-net"}, "TRUSTED_PROXIES"),
    ],
)
def test_a_bad_setting_is_refused_at_start_up_naming_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError, match=variable) as info:
        Settings.from_env(env)
    assert "\n" not in str(info.value)


def test_defaults_are_valid_and_values_are_typed() -> None:
    settings = Settings.from_env(
        {"HEARTBEAT_INTERVAL_S": "2.5", "MAX_STREAMS_TOTAL": "1_000", "ENABLE_SSE_STREAMING": "on"}
    )
    assert settings.heartbeat_interval_s == 2.5 and settings.max_streams_total == 1000
    assert settings.enable_sse_streaming is True
    assert Settings.from_env({}).rate_limit_per_window[0] >= 1
