"""Several serving processes on one port: ``bali-zero-bridge --workers N`` (or ``WORKERS``).

The parts: ``supervisor`` (the parent: binds the port, starts the workers, prints the listening
line once all are ready, forwards SIGTERM/SIGINT, replaces a worker that dies, exits 0 only when
every worker drained), ``child`` (a worker's entry: serves the inherited socket), ``role``
(``WorkerRole``: slot, server id, the supervisor's private directory) and ``peers`` (each worker's
private socket, through which the stats endpoint gathers every worker's figures).

What is shared between workers, and how:

* rate limits and stream caps: Redis (RATE_LIMIT_STORAGE; bridge/sharedcaps.py), required;
* resume and explicit stops: Redis (RESUME_STORE, bridge/resume), required with RESUME_GRACE_S > 0;
* the audit trail: the one SQLite store and its one hash chain; every append reads and moves the
  head inside one write transaction, so the workers' batches interleave without forking the chain,
  and the head is anchored under the same lock (bridge/audit/anchor.py);
* metrics: prometheus-client's multiprocess mode (files in the supervisor's private directory);
* stats: gathered from every worker's peer socket at request time.
"""

from bridge.workers.role import WorkerRole

__all__ = ["WorkerRole"]
