"""Chain heads anchored outside the store, so an emptied, truncated or rolled-back store is caught.

The chain and its head row live in the same file: whoever can write that file can delete every
row (``audit verify`` of the store alone then says "OK: 0 records") or cut the tail and put back an old,
validly MAC'd head row. Like CloudTrail's digest files, the fix keeps signed heads *elsewhere*:

* the bridge logs ``{"event":"audit_head","seq","hash","head_ts","mac"}`` (the log ships to the log
  store, out of reach of whoever holds the database), periodically and at shutdown;
* it writes the same head to ``<AUDIT_DB>.head`` beside the key: one JSON object, replaced
  atomically (temp file, fsync, rename), so it never grows and is never half-written.

A head is ``HMAC(head_key, "audit-head" || seq || hash || ts)``: a forged or edited head does not
verify, and without the key nobody can sign a head for a shortened chain. ``check_head`` decides
whether a store is consistent with a head: record ``seq`` is present with that hash, or was
removed by a retention purge whose (verified) checkpoint covers it.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bridge.audit.store import GENESIS, AuditStore, Edges, Link, Sealer
from bridge.errors import UnsafeFile
from bridge.safefiles import PRIVATE_DIRECTORY, TrustedDirectory, open_trusted

log = logging.getLogger("bridge.audit")

HEAD_EVENT = "audit_head"
MAX_HEAD_FILE_BYTES = 4096
"""A sealed head is ~250 bytes; anything larger is not ours and is not read into memory."""
MAX_LOG_LINE_BYTES = 64 * 1024
"""Longer log lines cannot be head lines; they are skipped without being held in memory."""


@dataclass(frozen=True, slots=True)
class AnchoredHead:
    """A signed chain head: the chain had record ``seq`` with ``hash`` at ``ts``."""

    seq: int
    hash: str
    ts: str
    mac: str

    def fields(self) -> dict[str, Any]:
        """As logged and sealed. ``head_ts``, not ``ts``: the JSON log line's own ``ts`` would shadow it."""
        return {"event": HEAD_EVENT, "seq": self.seq, "hash": self.hash, "head_ts": self.ts, "mac": self.mac}


class HeadSigner:
    """Signs and checks anchored heads with the head subkey."""

    def __init__(self, head_key: bytes) -> None:
        self._key = head_key

    def _mac(self, seq: int, digest: str, ts: str) -> str:
        return hmac.new(self._key, f"audit-head\n{seq}\n{digest}\n{ts}".encode(), hashlib.sha256).hexdigest()

    def sign(self, link: Link, ts: str) -> AnchoredHead:
        return AnchoredHead(link.id, link.hash, ts, self._mac(link.id, link.hash, ts))

    def valid(self, head: AnchoredHead) -> bool:
        return digest_equal(self._mac(head.seq, head.hash, head.ts), head.mac)

    def parse(self, data: Any) -> AnchoredHead | None:
        """An ``AnchoredHead`` from decoded JSON, or None if it is malformed or its MAC is wrong."""
        if not isinstance(data, dict) or data.get("event") != HEAD_EVENT:
            return None
        seq, digest, ts, mac = data.get("seq"), data.get("hash"), data.get("head_ts"), data.get("mac")
        if not (
            isinstance(seq, int)
            and not isinstance(seq, bool)
            and seq >= 0
            and isinstance(digest, str)
            and isinstance(ts, str)
            and isinstance(mac, str)
            and len(digest) <= 128
            and len(ts) <= 64
            and len(mac) <= 128
        ):
            return None
        head = AnchoredHead(seq, digest, ts, mac)
        return head if self.valid(head) else None


def digest_equal(a: str, b: str) -> bool:
    """Constant-time equality for digests read from hostile places (non-ASCII text included:
    ``hmac.compare_digest`` raises TypeError on non-ASCII ``str``, which would be a crash)."""
    return hmac.compare_digest(a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass"))


def head_path(db_path: str | os.PathLike[str]) -> Path:
    """The sealed head file: beside the store and its key, as ``<db>.head``."""
    return Path(f"{os.fspath(db_path)}.head")


class SealedHeadFile:
    """The latest anchored head of one store, in a file only the bridge's user can write."""

    def __init__(self, path: str | os.PathLike[str], signer: HeadSigner) -> None:
        self.path = Path(path)
        self._signer = signer

    def read(self) -> AnchoredHead | None:
        """The sealed head; None if there is no file. ``ValueError`` if it is not a valid head.

        Opened by ``bridge.safefiles`` rules: a symlink, a FIFO (opening one would block the writer
        thread), a device or another user's file is refused (``UnsafeFile``, a ``ValueError``), and
        kept as the evidence it is.
        """
        try:
            fd = open_trusted(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except UnsafeFile as exc:
            raise ValueError(f"sealed head file: {exc}") from None
        except OSError as exc:
            raise ValueError(f"sealed head file {self.path} cannot be opened: {exc}") from None
        with os.fdopen(fd, "rb") as f:
            data = f.read(MAX_HEAD_FILE_BYTES + 1)
        if len(data) > MAX_HEAD_FILE_BYTES:
            raise ValueError(f"sealed head file {self.path} is larger than a head")
        try:
            head = self._signer.parse(json.loads(data))
        except ValueError:
            head = None
        if head is None:
            raise ValueError(f"sealed head file {self.path} is not a valid signed head (edited or wrong key)")
        return head

    def write(self, head: AnchoredHead) -> None:
        """Replace the file atomically: a crash leaves the old head or the new one, never a mix.

        The temp file is created and renamed relative to the checked directory's descriptor; the
        rename replaces whatever entry is at the name (a symlink is replaced, never followed).
        """
        with TrustedDirectory.open(self.path.parent, create_mode=PRIVATE_DIRECTORY) as directory:
            tmp = f".{self.path.name}.{secrets.token_hex(8)}.tmp"
            fd = directory.open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            try:
                with os.fdopen(fd, "w", encoding="ascii") as f:
                    f.write(json.dumps(head.fields(), separators=(",", ":")) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path.name, src_dir_fd=directory.fd, dst_dir_fd=directory.fd)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp, dir_fd=directory.fd)
            directory.fsync()  # the rename itself is durable once its directory is


def log_head(head: AnchoredHead) -> None:
    """The JSON log line an operator greps from the log store for ``audit verify --heads-from``."""
    log.info("audit chain head", extra=head.fields())


@dataclass(frozen=True, slots=True)
class LogLine:
    """One ``audit_head`` line read from a log file: its line number, and the head if it verified."""

    number: int
    head: AnchoredHead | None


def heads_from_log(path: str | os.PathLike[str], signer: HeadSigner) -> Iterator[LogLine]:
    """Every line of ``path`` that claims to be an ``audit_head``, with its head if the MAC holds.

    Reads one bounded line at a time: a log file is input like any other, and a multi-gigabyte
    line must not become a multi-gigabyte string.
    """
    with open(path, "rb") as f:
        number = 0
        while True:
            line = f.readline(MAX_LOG_LINE_BYTES + 1)
            if not line:
                return
            number += 1
            if len(line) > MAX_LOG_LINE_BYTES and not line.endswith(b"\n"):
                while (rest := f.readline(MAX_LOG_LINE_BYTES)) and not rest.endswith(b"\n"):
                    pass
                continue
            if HEAD_EVENT.encode() not in line:
                continue
            try:
                data = json.loads(line)
            except ValueError:
                continue
            if isinstance(data, dict) and data.get("event") == HEAD_EVENT:
                yield LogLine(number, signer.parse(data))


@dataclass(frozen=True, slots=True)
class Coverage:
    """What the verified store vouches for: its records ``first..last`` and a purged prefix."""

    first_id: int | None
    last_id: int | None
    purged_through: Link | None
    hash_at: Callable[[int], str | None]


@dataclass(frozen=True, slots=True)
class HeadMismatch:
    """Why a store does not hold an anchored head; ``first_id`` is the first record missing or wrong."""

    first_id: int
    reason: str


def check_head(head: AnchoredHead, store: Coverage) -> HeadMismatch | None:
    """None if the store is consistent with ``head``; else why not, naming the missing records."""
    if head.seq == 0:
        return None if head.hash == GENESIS else HeadMismatch(0, "head 0 does not carry the genesis hash")
    purged = store.purged_through
    if purged is not None and head.seq <= purged.id:
        if head.seq == purged.id and not digest_equal(head.hash, purged.hash):
            return HeadMismatch(
                head.seq,
                f"record {head.seq} differs from the anchored head (the retention checkpoint names another hash)",
            )
        return None
    found = store.hash_at(head.seq)
    if found is None:
        if store.last_id is None:
            start = 1 if purged is None else purged.id + 1
            return HeadMismatch(
                start,
                f"records {start}..{head.seq} are missing: the store is empty "
                f"but a signed head says it held record {head.seq}",
            )
        if head.seq > store.last_id:
            return HeadMismatch(
                store.last_id + 1,
                f"records {store.last_id + 1}..{head.seq} are missing: the "
                f"store ends at record {store.last_id} (truncated or rolled back)",
            )
        return HeadMismatch(head.seq, f"record {head.seq} is missing")
    if not digest_equal(found, head.hash):
        return HeadMismatch(
            head.seq,
            f"record {head.seq} differs from the anchored head: the chain was "
            "rolled back and rewritten from an earlier record",
        )
    return None


def coverage_of(edges: Edges, hash_at: Callable[[int], str | None]) -> Coverage:
    """A ``Coverage`` from the store's ends alone (no walk): cheap enough to check before each seal."""
    first = edges.first
    purged = Link(first.id - 1, first.hash) if first is not None and first.hash != GENESIS else None
    return Coverage(first.id if first else None, edges.last_id, purged, hash_at)


class HeadAnchor:
    """The writer's side: sign the store's head, log it, and seal it beside the key.

    It never overwrites a sealed head the store no longer holds: if the store was truncated or
    rolled back (while the bridge was down, or under it), the sealed head is the evidence, so it
    is kept and the refusal logged CRITICAL; the signed heads keep going to the log.
    """

    def __init__(
        self,
        store: AuditStore,
        sealer: Sealer,
        signer: HeadSigner,
        sealed: SealedHeadFile | None,
        clock: Callable[[], str],
    ) -> None:
        self._store = store
        self._sealer = sealer
        self._signer = signer
        self._sealed = sealed
        self._clock = clock
        self._last: Link | None = None
        self.refused: str | None = None
        """Why the sealed head is no longer advanced (None while it is)."""

    def anchor(self) -> AnchoredHead | None:
        """Anchor the current head if it moved since the last call; never raises."""
        try:
            return self._anchor()
        except Exception:
            log.exception("audit head anchoring failed")
            return None

    def _anchor(self) -> AnchoredHead | None:
        """Under the store's write lock: with several workers appending to one chain, a head read
        and then sealed outside it could be overtaken (worker A reads head 100, B appends up to
        105 and seals it, A seals 100 over it), and the sealed head would no longer cover a tail
        an attacker could then cut."""
        with self._store.locked():
            return self._anchor_locked()

    def _anchor_locked(self) -> AnchoredHead | None:
        head = self._store.head()
        if head is None:
            if self._store.edges().last_id is not None:
                log.critical("audit chain head row is missing while records exist: head not anchored")
                return None
            link = Link(0, GENESIS)
        elif digest_equal(self._sealer.seal_head(head.link), head.mac):
            link = head.link
        else:
            log.critical("audit chain head row has an invalid MAC: head not anchored")
            return None
        if link == self._last:
            return None
        signed = self._signer.sign(link, self._clock())
        if self._last is None and not log.isEnabledFor(logging.INFO):
            log.warning(
                "LOG_LEVEL is above INFO, so signed audit chain heads are not logged; only %s anchors the chain now",
                self._sealed.path if self._sealed else "nothing",
            )
        log_head(signed)
        self._last = link
        if self._sealed is not None and self.refused is None:
            self._seal(self._sealed, signed)
        return signed

    def _seal(self, sealed: SealedHeadFile, signed: AnchoredHead) -> None:
        try:
            current = sealed.read()
        except ValueError as exc:
            self._refuse(str(exc))
            return
        if current is not None:
            mismatch = check_head(current, coverage_of(self._store.edges(), self._store.hash_at))
            if mismatch is not None:
                self._refuse(f"the store does not hold the sealed head {current.seq}: {mismatch.reason}")
                return
            if current.seq > signed.seq:
                return  # another writer sealed further already; a seal only moves forward
        sealed.write(signed)

    def _refuse(self, reason: str) -> None:
        self.refused = reason
        log.critical(
            "AUDIT STORE TAMPERED: %s; the sealed head file is kept as evidence and no longer "
            "advanced (signed heads still go to the log)",
            reason,
        )
