"""Anchored chain heads, in process: signing, the sealed file, log lines, and which stores hold a head."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import stat
import threading
from pathlib import Path

import pytest

from bridge.audit.anchor import (
    MAX_HEAD_FILE_BYTES,
    MAX_LOG_LINE_BYTES,
    AnchoredHead,
    Coverage,
    HeadSigner,
    SealedHeadFile,
    check_head,
    head_path,
    heads_from_log,
)
from bridge.audit.cli import run_purge, run_verify
from bridge.audit.keys import derive_keys
from bridge.audit.store import GENESIS, Link, SQLiteStore
from bridge.audit.trail import AuditTrail
from bridge.config import Settings
from bridge.errors import ConfigError
from bridge.types import Identity

KEYS = derive_keys(b"a" * 32)
HEX_KEY = (b"a" * 32).hex()  # the same key as AUDIT_HASH_KEY
SIGNER = HeadSigner(KEYS.head_key)
USER = Identity(client_ip="192.0.2.9", user_id="u")


def head(seq: int, digest: str = "h" * 64) -> AnchoredHead:
    return SIGNER.sign(Link(seq, digest), "2026-01-01T00:00:00.000000Z")


def test_signed_head_round_trips_and_any_edit_or_other_key_fails() -> None:
    signed = head(5)
    assert SIGNER.parse(json.loads(json.dumps(signed.fields()))) == signed
    for field, value in (("seq", 6), ("hash", "x" * 64), ("head_ts", "2030-01-01"), ("mac", "0" * 64)):
        assert SIGNER.parse({**signed.fields(), field: value}) is None, field
    assert HeadSigner(derive_keys(b"b" * 32).head_key).parse(signed.fields()) is None
    # the chain key cannot sign heads: a logged head is no use as the store's head row
    assert HeadSigner(KEYS.chain_key).parse(signed.fields()) is None


@pytest.mark.parametrize(
    "hostile",
    [
        [],
        "x",
        {"event": "audit_head"},
        {"event": "audit_head", "seq": True},
        {"event": "audit_head", "seq": -1, "hash": "", "head_ts": "", "mac": ""},
        {"event": "audit_head", "seq": 1, "hash": "h", "head_ts": "t", "mac": "ü"},
    ],
)
def test_hostile_head_json_is_rejected_without_raising(hostile: object) -> None:
    assert SIGNER.parse(hostile) is None


def test_sealed_file_is_owner_only_replaced_whole_and_bounded(tmp_path: Path) -> None:
    sealed = SealedHeadFile(tmp_path / "audit.sqlite3.head", SIGNER)
    assert sealed.read() is None
    sealed.write(head(1))
    sealed.write(head(2))
    assert sealed.read() == head(2)
    assert stat.S_IMODE(sealed.path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["audit.sqlite3.head"]  # no temp file left behind
    sealed.path.write_bytes(b" " * (MAX_HEAD_FILE_BYTES + 1))
    with pytest.raises(ValueError, match="larger"):
        sealed.read()
    sealed.path.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid signed head"):
        sealed.read()


def test_log_reader_skips_overlong_and_foreign_lines(tmp_path: Path) -> None:
    log = tmp_path / "combined.log"
    long_line = '{"event":"audit_head",' + "x" * (MAX_LOG_LINE_BYTES * 3) + "\n"
    entry = {"ts": "2026-01-01T00:00:00.000+00:00", "level": "INFO", **head(3).fields()}
    log.write_text(long_line + '{"event":"stream_end"}\nplain text audit_head\n' + json.dumps(entry) + "\n")
    lines = list(heads_from_log(log, SIGNER))
    assert [(line.number, line.head) for line in lines] == [(4, head(3))]


def coverage(first: int | None, last: int | None, purged: Link | None, hashes: dict[int, str]) -> Coverage:
    return Coverage(first, last, purged, hashes.get)


@pytest.mark.parametrize(
    ("store", "seq", "expected"),
    [
        (coverage(1, 5, None, {5: "h" * 64}), 5, None),
        (coverage(1, 5, None, {5: "other"}), 5, "record 5 differs"),
        (coverage(1, 3, None, {}), 5, "records 4..5 are missing"),
        (coverage(None, None, None, {}), 5, "records 1..5 are missing: the store is empty"),
        (coverage(11, 12, Link(10, "z"), {}), 7, None),  # purged by a verified checkpoint
        (coverage(11, 12, Link(10, "h" * 64), {}), 10, None),
        (coverage(11, 12, Link(10, "z"), {}), 10, "checkpoint names another hash"),
    ],
)
def test_which_stores_hold_a_head(store: Coverage, seq: int, expected: str | None) -> None:
    mismatch = check_head(head(seq), store)
    if expected is None:
        assert mismatch is None
    else:
        assert mismatch is not None and expected in mismatch.reason
    assert check_head(SIGNER.sign(Link(0, GENESIS), "t"), store) is None


async def fill(settings: Settings, n: int) -> None:
    trail = AuditTrail.from_settings(settings)
    await trail.start()
    for i in range(n):
        trail.record(trail.events.stream("stream_started", USER, f"r{i}", None, "q"))
    await trail.aclose()


async def test_a_head_older_than_a_purge_still_verifies(tmp_path: Path) -> None:
    settings = Settings(audit_db=str(tmp_path / "audit.sqlite3"), audit_hash_key=HEX_KEY)
    await fill(settings, 5)
    sealed = SealedHeadFile(head_path(settings.audit_db), SIGNER)
    assert sealed.read().seq == 5  # type: ignore[union-attr]
    out = io.StringIO()
    assert run_purge(settings, 0, out) == 0 and "purged 5" in out.getvalue()
    out = io.StringIO()
    assert run_verify(settings, out) == 0, out.getvalue()  # head 5 was purged, the checkpoint covers it


async def test_fresh_store_is_sealed_at_start_and_the_final_head_at_close(tmp_path: Path) -> None:
    settings = Settings(audit_db=str(tmp_path / "audit.sqlite3"), audit_hash_key=HEX_KEY)
    trail = AuditTrail.from_settings(settings)
    await trail.start()
    await trail.flush()
    sealed = SealedHeadFile(head_path(settings.audit_db), SIGNER)
    assert sealed.read() is not None and sealed.read().seq == 0  # type: ignore[union-attr]
    trail.record(trail.events.stream("stream_started", USER, "r", None, "q"))
    await trail.aclose()
    assert sealed.read().seq == 1  # type: ignore[union-attr]


class ObservedSeal(SealedHeadFile):
    """The real sealed file, signalling each write (so the test awaits writes instead of sleeping)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, SIGNER)
        self.seqs: list[int] = []
        self.written = threading.Condition()

    def write(self, head: AnchoredHead) -> None:
        super().write(head)
        with self.written:
            self.seqs.append(head.seq)
            self.written.notify_all()

    def wait_for(self, seq: int) -> bool:
        with self.written:
            return self.written.wait_for(lambda: seq in self.seqs, timeout=10)


async def test_heads_are_anchored_periodically_while_records_arrive(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "audit.sqlite3"
    seal = ObservedSeal(head_path(db))
    trail = AuditTrail(SQLiteStore(db), KEYS, sealed=seal, head_interval_s=0.01)
    with caplog.at_level(logging.INFO, logger="bridge.audit"):
        await trail.start()
        for n in (1, 2):
            trail.record(trail.events.stream("stream_started", USER, f"r{n}", None, "q"))
            await trail.flush()
            assert await asyncio.to_thread(seal.wait_for, n)  # before close: the timer did it
        await trail.aclose()
    assert seal.seqs == [0, 1, 2]  # unchanged heads are not written again
    logged = [r for r in caplog.records if getattr(r, "event", None) == "audit_head"]
    assert [r.__dict__["seq"] for r in logged] == [0, 1, 2]


def test_head_interval_is_validated() -> None:
    with pytest.raises(ConfigError, match="AUDIT_HEAD_INTERVAL_S"):
        Settings.from_env({"AUDIT_HEAD_INTERVAL_S": "0"})
    assert Settings.from_env({"AUDIT_HEAD_INTERVAL_S": "5"}).audit_head_interval_s == 5.0
