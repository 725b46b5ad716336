"""Shared resume across bridge instances through Redis (``RESUME_STORE=redis://host:port/db``).

The parts: ``keys`` (the key layout below, pure), ``client`` (``ResumeStore``: this instance's
connection, health and counters, created in the app's lifespan and exported as Prometheus
metrics), ``mirror`` (``FrameMirror``: the owner's writer) and ``remote`` (``RemoteStream``: a
reader on another instance).

Without it a stream can be resumed only on the instance that owns its gRPC call, so behind a load
balancer without sticky sessions most reconnects would get ``STREAM_EXPIRED``. With it:

* the owner (instance A) mirrors every frame it produces into a Redis stream, off the hot path
  (``FrameMirror``: ``offer`` only queues; one task per session flushes batches in a pipeline);
* any other instance (B) serves a ``Last-Event-ID`` reconnect from Redis (``RemoteStream``), the
  very bytes A produced, until the final frame;
* B's reader keeps a short-TTL reader key alive, which A's grace timer consults before cancelling
  upstream (``FrameMirror.reader_hold_s``), and an explicit stop on B reaches A over pub/sub.

Key layout (all expire on their own, so a crashed instance leaves nothing behind for long):

``bzb:frames:{stream_id}``
    Redis stream; entry id ``{seq}-0`` (seq = the SSE event id's number) with field ``d`` = frame
    bytes and ``f`` = ``1`` on the final ``done``/``error`` frame. Explicit ids make order and
    dedupe exact: a retried batch's XADD of an id already there fails and is ignored. A stream that
    ended without a final frame (cancelled, expired) gets one end marker ``{last_seq}-1`` with field
    ``end`` = outcome. ``MAXLEN ~ RESUME_BUFFER_FRAMES``.
``bzb:meta:{stream_id}``
    hash: ``owner`` (SHA-256 of the caller's identity key: no user id or IP stored in clear; the
    key carries its kind, ``user:``/``proxy:``/``ip:``, so a proxy-asserted ``alice`` never owns
    the verified ``alice``'s streams),
    ``instance`` (the owner's id, which names its cancel channel), ``request_id``, ``last_seq``,
    ``final_seq`` once the final frame is stored, ``end`` once the session is over.
``bzb:ended:{stream_id}``
    set by the owner's closing flush of a stream that has its final frame (``SET NX``, so a
    retried flush keeps the first), with TTL ``end_hold_max_s`` = ``ENDED_HOLD_WINDOWS`` (4)
    windows + 1 s: its remaining PTTL is how much longer readers may hold the stream's keys.
``bzb:reader:{stream_id}``
    present while a reader on another instance holds the stream (TTL ``reader_ttl_s``, refreshed
    every third of it); set to the grace window when that reader's client leaves.
``bzb:cancel:{instance}``
    pub/sub channel; the message is a stream id to cancel. One subscriber task per instance.

TTLs: frames and meta live ``RESUME_GRACE_S + ttl_margin_s`` while the owner runs (refreshed with
every batch and at least every third of that when no frame comes), and ``RESUME_GRACE_S + 1`` once
the stream is over. After that, as in the owner's registry, the window counts from when a reader
left, not from the end: whenever a reader of the ended stream leaves (on the owner or elsewhere),
and while one is still attached, ``ResumeStore.hold_ended`` re-arms them to ``RESUME_GRACE_S + 1``
from that moment, never shortening (``PEXPIRE GT``) and never past the ended key's remaining PTTL
(one Lua script, so the cap is exact). Counted from the end only, a reader that lagged behind a
finished answer and then dropped found the keys gone within its own window (STREAM_EXPIRED); with
no cap, a client replaying an old ``Last-Event-ID`` would keep them for ever. So keys outlive the
window in which a reconnect is allowed, by at most a second, and never four windows past the end.

Failure behaviour: every Redis call is bounded by a timeout and no Redis call is awaited by the
pump that delivers tokens. If Redis is slow or down, the owner keeps serving its local client; a
session's unflushed frames are retried with backoff and, once they exceed the resume buffer or the
store has failed for a whole TTL, that session gives up mirroring (counted, logged once per outage)
and falls back to single-instance rules. A reader on B that cannot reach Redis ends with a
retryable ``RESUME_UNAVAILABLE`` error frame carrying the last id it sent, so the client can retry
(possibly reaching A); a reader that finds the meta record gone ends with ``STREAM_EXPIRED``.
"""
