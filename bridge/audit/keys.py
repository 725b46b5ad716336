"""The audit key: loaded from AUDIT_HASH_KEY or a generated ``<db>.key`` file, split into subkeys.

One master key is expanded (HKDF, RFC 5869, over HMAC-SHA256) into independent subkeys, so a value
computed with one cannot stand in for another: without the split, the HMAC of a *query* "10.0.0.1"
would equal the pseudonym of the *IP* 10.0.0.1, and a query hash could be replayed as a chain hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from bridge.config import key_material, key_material_problem
from bridge.errors import ConfigError
from bridge.safefiles import PRIVATE_DIRECTORY, TrustedDirectory

log = logging.getLogger("bridge.audit")

_SALT = b"bali-zero-bridge/audit/v1"
MAX_KEY_FILE_BYTES = 4096
"""A generated key file is 65 bytes; anything much larger is not a key and is not read into memory."""


@dataclass(frozen=True, slots=True, repr=False)
class AuditKeys:
    """The subkeys; ``repr`` is hidden so a key never reaches a log line or traceback.

    ``head_key`` signs the chain heads anchored outside the store (log lines, the sealed head
    file). It is not ``chain_key``: the in-store head row is MAC'd with that, and anchored heads are
    readable by whoever reads the logs, so one key for both would let an old logged head be written
    back as the store's head row after a rollback.
    """

    query_key: bytes
    pseudonym_key: bytes
    chain_key: bytes
    head_key: bytes

    def query_hmac(self, query: str) -> str:
        """HMAC-SHA256 hex of a query: equal queries can be correlated, but not read back."""
        return hmac.new(self.query_key, query.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()

    def pseudonym(self, client_ip: str) -> str:
        """The stable pseudonymous user id of an anonymous caller, derived from the IP."""
        return "anon:" + hmac.new(self.pseudonym_key, client_ip.encode(), hashlib.sha256).hexdigest()


def derive_keys(master: bytes) -> AuditKeys:
    """Expand the master key into the query, pseudonym, chain and head-anchor subkeys."""
    prk = hmac.new(_SALT, master, hashlib.sha256).digest()

    def expand(label: str) -> bytes:  # one HKDF-Expand block: 32 bytes are all we need
        return hmac.new(prk, label.encode() + b"\x01", hashlib.sha256).digest()

    return AuditKeys(
        query_key=expand("query-hmac"),
        pseudonym_key=expand("ip-pseudonym"),
        chain_key=expand("record-chain"),
        head_key=expand("head-anchor"),
    )


def key_path(db_path: str | os.PathLike[str]) -> Path:
    """Where the generated key lives: beside the store, as ``<db>.key``."""
    return Path(f"{os.fspath(db_path)}.key")


def load_master_key(db_path: str | os.PathLike[str], configured: str = "", *, create: bool = True) -> bytes:
    """The master key: ``configured`` (AUDIT_HASH_KEY) if set, else the key file, generated if missing.

    A present but unreadable or empty key file is an error, never silently replaced: a new key
    would make every existing record fail verification. The file is opened by
    ``bridge.safefiles`` rules: no symlink, owned by the bridge's user, in a directory only it (or
    root) can write, and refused (``UnsafeFile``) if group or others can write it, since they
    could have chosen the key; one only readable by others is tightened to 0600 on its descriptor.
    """
    if configured:
        return _material(configured, "AUDIT_HASH_KEY")
    path = key_path(db_path)
    missing = ConfigError(f"audit key file {path} does not exist and AUDIT_HASH_KEY is not set")
    try:
        directory = TrustedDirectory.open(path.parent, create_mode=PRIVATE_DIRECTORY if create else None)
    except FileNotFoundError:
        raise missing from None
    with directory:
        try:
            fd = directory.open_file(path.name, os.O_RDONLY, refuse_writable=True)
        except FileNotFoundError:
            if not create:
                raise missing from None
            _create_key_file(directory, path.name)
            fd = directory.open_file(path.name, os.O_RDONLY, refuse_writable=True)
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_KEY_FILE_BYTES + 1)
    if len(data) > MAX_KEY_FILE_BYTES:
        raise ConfigError(f"audit key file {path} is larger than a key (expected 64 hex digits)")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ConfigError(f"audit key file {path} is not ASCII text (expected 64 hex digits)") from None
    return _material(text, f"audit key file {path}")


def load_keys(db_path: str | os.PathLike[str], configured: str = "", *, create: bool = True) -> AuditKeys:
    """Load the master key and derive the subkeys."""
    return derive_keys(load_master_key(db_path, configured, create=create))


def _material(text: str, source: str) -> bytes:
    """Hex is decoded (so a key file's content pasted into AUDIT_HASH_KEY is the same key); else UTF-8."""
    problem = key_material_problem(text)
    if problem:
        raise ConfigError(f"{source} {problem}")
    return key_material(text)


def write_key_file(db_path: str | os.PathLike[str], master: bytes) -> None:
    """Store ``master`` as the key file of ``db_path`` (a backup's), as hex; never over an existing file."""
    path = key_path(db_path)
    with TrustedDirectory.open(path.parent, create_mode=PRIVATE_DIRECTORY) as directory:
        if not _publish_key_file(directory, path.name, master.hex()):
            raise ConfigError(f"audit key file {path} already exists")


def _create_key_file(directory: TrustedDirectory, name: str) -> None:
    if _publish_key_file(directory, name, secrets.token_hex(32)):
        log.warning("generated a new audit key at %s; back it up with the store", directory.name(name))


def _publish_key_file(directory: TrustedDirectory, name: str, text: str) -> bool:
    """Write a key atomically with 0600: a temp file linked into place; False if ``name`` existed.

    ``link`` fails if another process won the race, so two bridges starting together on one store
    end up with the same key instead of each overwriting the other's.
    """
    tmp = f".{name}.{secrets.token_hex(8)}.tmp"
    fd = directory.open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, name, src_dir_fd=directory.fd, dst_dir_fd=directory.fd, follow_symlinks=False)
        except FileExistsError:
            return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=directory.fd)
        directory.fsync()
    return True
