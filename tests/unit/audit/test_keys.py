"""The audit key file: created 0600 once, reused afterwards, never silently replaced."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from bridge.audit.keys import derive_keys, key_path, load_keys, load_master_key
from bridge.errors import ConfigError


def test_key_file_is_generated_0600_and_reused(tmp_path: Path) -> None:
    db = tmp_path / "data" / "audit.sqlite3"
    first = load_master_key(db)
    path = key_path(db)
    assert path == tmp_path / "data" / "audit.sqlite3.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(first) == 32
    assert load_master_key(db) == first
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind


def test_loose_permissions_are_tightened(tmp_path: Path) -> None:
    db = tmp_path / "audit.sqlite3"
    load_master_key(db)
    key_path(db).chmod(0o644)
    load_master_key(db)
    assert stat.S_IMODE(key_path(db).stat().st_mode) == 0o600


def test_configured_key_wins_and_hex_matches_the_file_form(tmp_path: Path) -> None:
    db = tmp_path / "audit.sqlite3"
    from_file = load_master_key(db)
    hex_text = key_path(db).read_text().strip()
    assert load_master_key(tmp_path / "other.sqlite3", hex_text) == from_file
    assert not key_path(tmp_path / "other.sqlite3").exists()
    assert load_master_key(db, "a passphrase of enough length") == b"a passphrase of enough length"


def test_short_or_missing_keys_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="AUDIT_HASH_KEY"):
        load_master_key(tmp_path / "a.sqlite3", "short")
    with pytest.raises(ConfigError, match="does not exist"):
        load_keys(tmp_path / "b.sqlite3", create=False)
    key_path(tmp_path / "c.sqlite3").write_text("\n")
    with pytest.raises(ConfigError):
        load_master_key(tmp_path / "c.sqlite3")


def test_subkeys_are_distinct_and_hidden_from_repr() -> None:
    keys = derive_keys(b"m" * 32)
    assert len({keys.query_key, keys.pseudonym_key, keys.chain_key}) == 3
    assert keys.query_key.hex() not in repr(keys)
    assert derive_keys(b"m" * 32) == keys
