"""``WorkerRole``: where one serving process stands in its server."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True, slots=True)
class WorkerRole:
    """One of ``count`` workers of the server ``server_id``; a plain one-process bridge is 0 of 1.

    ``runtime_dir`` is the supervisor's private directory (0700, removed at exit): the workers'
    metric files (prometheus-client's multiprocess mode) and their peer sockets live there. Slot 0
    is the primary: it alone runs the audit retention purges (any worker could, safely, but each
    purge verifies the whole chain first, and N of them at every start are N times the work).
    """

    slot: int = 0
    count: int = 1
    server_id: str = field(default_factory=lambda: secrets.token_hex(8))
    runtime_dir: Path | None = None

    @property
    def primary(self) -> bool:
        return self.slot == 0

    @property
    def metrics_dir(self) -> Path | None:
        return None if self.runtime_dir is None else self.runtime_dir / "metrics"

    @property
    def peers_dir(self) -> Path | None:
        return None if self.runtime_dir is None else self.runtime_dir / "peers"


def metric_files_id(slot: int) -> str:
    """What names the metric files of the worker in ``slot`` (prometheus-client names them after the
    pid by default). Every worker of a slot, replacements included, writes the same files, and the
    supervisor starts a replacement only once its predecessor has exited, so no two live processes
    share them. Named after pids, each replaced worker left its files behind: a worker crash-looping
    for hours filled the directory, and every scrape reads every file."""
    return f"slot{slot}"
