"""The resume store's Redis key layout and record format (pure; documented in bridge/resume)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

BATCH = 256  # frames per pipeline round trip, and per XREAD

# The ``end`` a mirror that gave up stores: the stream may still run on its owner, unmirrored.
LOST = "lost"


def frames_key(stream_id: str) -> str:
    return f"bzb:frames:{stream_id}"


def meta_key(stream_id: str) -> str:
    return f"bzb:meta:{stream_id}"


def reader_key(stream_id: str) -> str:
    return f"bzb:reader:{stream_id}"


def ended_key(stream_id: str) -> str:
    return f"bzb:ended:{stream_id}"


def cancel_channel(instance: str) -> str:
    return f"bzb:cancel:{instance}"


def owner_tag(identity_key: str) -> str:
    """The stored owner: a hash, so no user id or IP is kept in clear in Redis."""
    return hashlib.sha256(identity_key.encode("utf-8")).hexdigest()


def seq_of(entry_id: bytes | str) -> tuple[int, int]:
    """A Redis stream entry id ``{seq}-{part}`` as numbers (part 1 is an end marker)."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, part = text.partition("-")
    return int(ms), int(part or "0")


@dataclass(frozen=True, slots=True)
class StoredStream:
    """The meta record of a stream as read from Redis."""

    stream_id: str
    owner: str
    instance: str
    request_id: str
    last_seq: int
    final_seq: int | None
    end: str | None

    @property
    def over(self) -> bool:
        """The owner stored the stream's end: it runs nowhere any more (``LOST`` says only that
        mirroring stopped; the owner may still be streaming it)."""
        return self.end is not None and self.end != LOST

    @classmethod
    def parse(cls, stream_id: str, raw: dict[bytes, bytes]) -> StoredStream | None:
        """The record, or None when there is none or it cannot be read (``unreadable`` tells which).

        A damaged record (bytes that are not UTF-8, a seq that is not an integer) reads as no
        record: the stream is answered as expired. Raised instead, it answered the reconnect and
        the cancel of that id with a 500 and a traceback.
        """
        if not raw or b"owner" not in raw:
            return None
        try:
            text = {k.decode(): v.decode() for k, v in raw.items()}
            final = text.get("final_seq")
            return cls(
                stream_id=stream_id,
                owner=text["owner"],
                instance=text.get("instance", ""),
                request_id=text.get("request_id", ""),
                last_seq=int(text.get("last_seq", "0")),
                final_seq=int(final) if final else None,
                end=text.get("end") or None,
            )
        except ValueError:  # UnicodeDecodeError is one
            return None

    @staticmethod
    def unreadable(raw: dict[bytes, bytes], parsed: StoredStream | None) -> bool:
        """A record was there but ``parse`` could not read it."""
        return parsed is None and bool(raw) and b"owner" in raw
