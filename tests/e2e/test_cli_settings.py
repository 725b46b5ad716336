"""`bali-zero-bridge --help` and `config` show the settings; `audit` finds the server's store from anywhere."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx

from bridge.config import Settings, mask_url_password
from tests.conftest import StubFactory
from tests.support.processes import ROOT, Bridge, base_env


def bridge_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=base_env({"PYTHONPATH": str(ROOT), **(env or {})}),
        timeout=60,
    )


def test_help_lists_the_configuration_variables_and_the_config_command(tmp_path: Path) -> None:
    shown = bridge_cli("--help", cwd=tmp_path)
    assert shown.returncode == 0
    for name in ("RAG_TARGET", "ENABLE_SSE_STREAMING", "AUDIT_DB", "JWT_SECRET", "OTEL_*", "config", "/docs"):
        assert name in shown.stdout, name


def test_config_prints_effective_settings_with_secrets_masked(tmp_path: Path) -> None:
    secrets = {
        "JWT_SECRET": "jwt-secret-value-123",
        "AUDIT_HASH_KEY": "audit-key-material-456789",
        "RESUME_STORE": "redis://:redis-password-1@127.0.0.1:6379/0",
        "RATE_LIMIT_STORAGE": "redis://limiter:redis-password-2@127.0.0.1:6379/1",
        "OTEL_EXPORTER_OTLP_HEADERS": "api-key=otlp-api-key-3",
    }
    shown = bridge_cli("config", cwd=tmp_path, env={**secrets, "RATE_LIMIT": "5/second"})
    assert shown.returncode == 0, shown.stderr
    lines = dict(line.split("=", 1) for line in shown.stdout.splitlines())
    for leaked in (
        "jwt-secret-value-123",
        "audit-key-material-456789",
        "redis-password-1",
        "redis-password-2",
        "otlp-api-key-3",
    ):
        assert leaked not in shown.stdout + shown.stderr
    assert lines["JWT_SECRET"] == lines["AUDIT_HASH_KEY"] == "(set, hidden)"
    assert lines["RESUME_STORE"] == "redis://:***@127.0.0.1:6379/0"
    assert lines["RATE_LIMIT_STORAGE"] == "redis://limiter:***@127.0.0.1:6379/1"
    assert lines["RATE_LIMIT"] == "5/second"
    assert lines["AUDIT_DB"] == str(tmp_path / "data" / "audit.sqlite3")  # absolute, as the server uses it
    assert {name for name in lines if not name.startswith("OTEL_")} == {
        name.upper() for name in Settings.__dataclass_fields__ if name != "otel"
    }
    assert not (tmp_path / "data").exists()  # printing settings writes nothing


def test_config_refuses_bad_settings_like_the_server(tmp_path: Path) -> None:
    shown = bridge_cli("config", cwd=tmp_path, env={"RESUME_STORE": "http://x"})
    assert shown.returncode == 2 and "RESUME_STORE" in shown.stderr


def test_mask_url_password() -> None:
    assert mask_url_password("rediss://u:p%40ss@h:6380/2") == "rediss://u:***@h:6380/2"
    assert mask_url_password("redis://h:6379/0") == "redis://h:6379/0"
    assert mask_url_password("memory://") == "memory://"


def test_audit_verify_finds_the_servers_store_from_another_directory(stub_factory: StubFactory, tmp_path: Path) -> None:
    """A relative AUDIT_DB in an env file is relative to that file, for the server and `audit` alike;
    `--env-file` may follow the audit command, as people type it."""
    config_dir, server_cwd, operator_cwd = (tmp_path / name for name in ("etc", "srv", "home"))
    for folder in (config_dir, server_cwd, operator_cwd):
        folder.mkdir()
    stub = stub_factory()
    env_file = config_dir / "bridge.env"
    env_file.write_text(f"AUDIT_DB=./data/audit.sqlite3\nRAG_TARGET={stub.target}\n")
    bridge = Bridge({"LOG_LEVEL": "WARNING"}, "--env-file", str(env_file), cwd=server_cwd)
    try:
        reply = httpx.post(bridge.url + "/api/v2/bali-zero/chat", json={"query": "B211A visa"}, timeout=30)
        assert reply.status_code == 200
    finally:
        bridge.stop()
    assert bridge.proc.returncode == 0
    store = config_dir / "data" / "audit.sqlite3"
    assert store.is_file() and not (server_cwd / "data").exists()
    verified = bridge_cli("audit", "verify", "--env-file", "../etc/bridge.env", cwd=operator_cwd)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.startswith("audit chain OK:") and str(store) in verified.stdout
    missing = bridge_cli("audit", "verify", cwd=operator_cwd)  # without the server's settings: says so
    assert missing.returncode == 2 and "AUDIT_DB" in missing.stdout and str(operator_cwd) in missing.stdout
