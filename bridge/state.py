"""Everything the handlers share for the app's lifetime, built once from Settings."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.requests import Request

from bridge.audit import AuditTrail
from bridge.audit.events import SecurityKind
from bridge.audit.refusals import RefusalLedger
from bridge.auth import Authenticator
from bridge.config import Settings
from bridge.errors import BridgeError, ServiceUnavailable
from bridge.gate import Gate
from bridge.inputs import Limits
from bridge.metrics import BridgeMetrics
from bridge.ratelimit import RateLimiter
from bridge.resume.client import ResumeStore
from bridge.sharedcaps import caps_for
from bridge.stats import FanOut, StreamStats
from bridge.stream.registry import SessionRegistry
from bridge.stream.source import StreamPolicy
from bridge.streamcap import Caps
from bridge.telemetry import Telemetry, request_ids
from bridge.types import Identity
from bridge.upstream import Upstream
from bridge.workers.role import WorkerRole

log = logging.getLogger("bridge")

# How long the drain waits for the streams it ended to wind down: an aborted pump ends within a
# few event-loop turns (its gRPC call is cancelled), so this bound is reached only by a bug.
ABORTED_STREAMS_WAIT_S = 2.0


@dataclass(slots=True)
class BridgeState:
    settings: Settings
    gate: Gate
    caps: Caps
    policy: StreamPolicy
    limits: Limits
    telemetry: Telemetry
    metrics: BridgeMetrics
    stats: StreamStats
    observer: FanOut
    audit: AuditTrail
    refusals: RefusalLedger
    role: WorkerRole = field(default_factory=WorkerRole)
    registry: SessionRegistry = field(default_factory=SessionRegistry)
    upstream: Upstream | None = None  # opened in the lifespan (a channel is bound to its loop)
    resume_store: ResumeStore | None = None  # likewise; None without RESUME_STORE or a grace window
    _drain_task: asyncio.Task[None] | None = None
    _grace_cut: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    def from_settings(
        cls, settings: Settings, telemetry: Telemetry | None = None, role: WorkerRole | None = None
    ) -> BridgeState:
        role = role or WorkerRole()
        metrics = BridgeMetrics(multiprocess_dir=role.metrics_dir)
        stats = StreamStats(settings.stats_window_s)
        audit = AuditTrail.from_settings(
            settings, on_drop=lambda reason, count: metrics.audit_dropped(count), retention=role.primary
        )
        refusals = RefusalLedger(audit, settings.audit_refusal_window_s)

        def limiter(reason: str, rate: tuple[int, int] | None = None, key_space: str = "") -> RateLimiter:
            return RateLimiter(
                settings,
                rate=rate,
                key_space=key_space,
                on_violation=lambda key, decision: metrics.rate_limited(reason),
                on_storage_error=lambda exc: metrics.rate_limit_storage_failed(),
            )

        def recorder(kind: SecurityKind) -> Callable[[Request, Identity, BridgeError], None]:
            def record(request: Request, identity: Identity, error: BridgeError) -> None:
                request_id, trace_id = request_ids(request)
                path = request.url.path
                refusals.refused(kind, identity, request_id=request_id, trace_id=trace_id, path=path, reason=error.code)

            return record

        gate = Gate(
            settings,
            Authenticator(settings),
            limiter("rate"),
            auth_failures=limiter("auth_failures", settings.auth_failure_rate_per_window, "auth-failures"),
            control=limiter("control", settings.control_rate_per_window, "control"),
            on_auth_failure=recorder("auth_failed"),
            on_rejected=recorder("rate_limited"),
        )
        return cls(
            settings=settings,
            gate=gate,
            caps=caps_for(settings, role.server_id, on_storage_error=lambda exc: metrics.rate_limit_storage_failed()),
            role=role,
            telemetry=telemetry or Telemetry.from_settings(settings),
            metrics=metrics,
            stats=stats,
            observer=FanOut(metrics, stats),
            audit=audit,
            refusals=refusals,
            policy=StreamPolicy(
                heartbeat_interval_s=settings.heartbeat_interval_s,
                send_timeout_s=settings.send_timeout_s,
                resume_grace_s=settings.resume_grace_s,
                window_frames=settings.stream_window_frames,
                buffer_frames=settings.resume_buffer_frames,
                buffer_bytes=settings.resume_buffer_bytes,
            ),
            limits=Limits(settings.max_query_bytes, settings.max_body_bytes, settings.max_history_messages),
        )

    @property
    def rag(self) -> Upstream:
        if self.upstream is None:
            raise ServiceUnavailable("the bridge is starting", code="STARTING", retryable=True, retry_after_s=1)
        return self.upstream

    def begin_drain(self) -> None:
        """SIGTERM: refuse new requests, let streams run for SHUTDOWN_GRACE_S, then end the rest.

        "Streams" are every stream this instance serves that a client can still read: the
        sessions it owns, attached to a reader or detached inside their resume window with a
        resume store (a client may be reading one on another instance, or come back there), and
        the readers it serves from the store. A detached session with no store is unreachable
        once the listener is closed: it is ended at once, or as soon as its reader leaves. Each
        stream ends with a final retryable SHUTTING_DOWN frame, which a resume can read (elsewhere
        from the store, or as the reader's last frame), and reports its end before the audit
        trail closes (``drained``).
        """
        if self.gate.draining:
            return
        self.gate.draining = True
        self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    def end_streams_now(self) -> None:
        """A second Ctrl-C: cut the grace short and end the running streams with SHUTTING_DOWN now.

        uvicorn's own answer to a second Ctrl-C ("force quit") skips the lifespan shutdown, so
        the audit queue would not be flushed, and the open handlers would be cancelled mid-stream,
        logging a CancelledError traceback for each.
        """
        self.begin_drain()
        self._grace_cut.set()

    async def drained(self) -> None:
        """Drain (if no signal started it) and return once every stream has ended and reported
        its end, bounded by SHUTDOWN_GRACE_S plus ``ABORTED_STREAMS_WAIT_S``.

        The lifespan awaits this before it closes the resume store and the audit trail. Going on
        as soon as no HTTP request is open would cut short every detached stream (no connection,
        inside its resume window): the upstream channel would close under it, the resume store
        close before its end is mirrored (a reader elsewhere would get STREAM_EXPIRED instead of
        SHUTTING_DOWN, and a stop sent there find no owner listening: 503), and its end record
        reach an audit trail already closed (dropped).
        """
        self.begin_drain()
        assert self._drain_task is not None
        await self._drain_task

    async def _drain(self) -> None:
        shutting_down = ServiceUnavailable(
            "the bridge is shutting down; reconnect to continue",
            code="SHUTTING_DOWN",
            retryable=True,
            retry_after_s=1,
        )
        self.registry.refuse_reconnects(shutting_down)  # the grace is for streams a client can read
        grace = asyncio.ensure_future(self.registry.wait_ended(self.settings.shutdown_grace_s))
        cut = asyncio.ensure_future(self._grace_cut.wait())
        await asyncio.wait({grace, cut}, return_when=asyncio.FIRST_COMPLETED)
        grace.cancel()
        cut.cancel()
        ended = self.registry.abort_all(shutting_down)
        if ended:
            log.warning("shutdown grace over: ended %d running stream(s)", ended)
        if not await self.registry.wait_ended(ABORTED_STREAMS_WAIT_S):
            log.warning("shutdown: streams still running after being ended; their end may go unrecorded")
