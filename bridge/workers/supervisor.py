"""The parent of ``--workers N``: one port, N serving processes, one exit status.

* It binds one socket per worker to the port with SO_REUSEPORT (the kernel spreads new
  connections over them evenly) and keeps every one of them: a worker that dies leaves its
  socket, and the connections queued on it, to its replacement. Port 0 is resolved once, by the
  first socket, and the others bind the port it got.
* Each worker is a fresh interpreter (``python -m bridge.workers.child``), never a fork of this
  one: no SQLite connection, gRPC channel, Redis pool or event loop crosses a fork. It inherits
  its socket and one end of a control socketpair, and is started in a session of its own, so a
  terminal's Ctrl-C reaches the parent alone (which forwards it once) and not every worker twice.
* A worker writes ``ready`` on the control socket once it serves; the parent prints the
  ``bali-zero-bridge listening on http://HOST:PORT`` line once, when every worker did. A worker
  that exits before its first start is complete fails the whole start with that worker's status
  (its own one-line error is on the shared stderr), as a one-process bridge would.
* SIGTERM or SIGINT is forwarded to every worker, which drains like a one-process bridge (refuse
  new requests, let streams finish within SHUTDOWN_GRACE_S, end the rest with a retryable
  ``SHUTTING_DOWN`` frame, flush the audit trail); a second one is forwarded too (end streams now).
  The parent exits 0 only when every worker exited 0.
* A worker that exits while the server is not stopping is replaced in its slot (at once if it had
  been serving, else after a backoff doubling up to ``MAX_BACKOFF_S``, so a worker that cannot
  start does not spin). Its live gauges are dropped; its replacement takes over its metric files,
  so its counts go on and the directory holds one set of files per slot however often workers
  are replaced. Streams of a worker stopped by a signal end with the retryable frame; those of a
  worker killed outright (SIGKILL, OOM) are cut, and their clients reconnect with Last-Event-ID.
* A slot whose worker failed to start (or could not even be started: no fork, no descriptor)
  gets a fresh socket, bound but not listening: its worker listens once it serves (uvicorn's
  ``create_server``). The old one is closed, resetting the connections queued on it. Kept
  listening, the kernel would go on giving it 1/N of all new connections, which would wait in its
  queue for as long as the slot cannot start: for ever, for a worker that can never start.
* If the parent itself is killed, each worker sees its control socket close and drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.multiprocess import mark_process_dead

from bridge.config import Settings
from bridge.errors import ConfigError
from bridge.workers.peers import socket_path
from bridge.workers.role import metric_files_id

log = logging.getLogger("bridge.workers")

MAX_BACKOFF_S = 10.0
LISTEN_BACKLOG = 2048  # uvicorn's default backlog
MAX_UNIX_PATH_BYTES = 107  # sockaddr_un.sun_path, less its terminating NUL
READY = b"ready\n"


@dataclass(slots=True)
class Worker:
    slot: int
    process: asyncio.subprocess.Process
    control: socket.socket
    ready: asyncio.Future[bool] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    started: float = field(default_factory=time.monotonic)
    watcher: asyncio.Task[None] | None = None
    """The task that resolves ``ready`` and notes the exit. Held here: the loop keeps only a weak
    reference to a task, and a watcher collected mid-await left ``ready`` pending for ever (the
    supervisor then never announced, nor stopped on SIGTERM)."""


def supervise(settings: Settings, environ: Mapping[str, str], host: str, port: int) -> int:
    """Run ``settings.workers`` workers on ``host:port`` until stopped; the process exit status."""
    from bridge.logs import configure_logging

    try:
        configure_logging(settings)
        runtime = _runtime_dir(settings.workers)
    except ConfigError as exc:
        print(f"bali-zero-bridge: invalid configuration: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"bali-zero-bridge: cannot start: {exc}", file=sys.stderr)
        return 1
    try:
        return _supervise_in(runtime, settings, environ, host, port)
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


def _runtime_dir(workers: int) -> Path:
    """The supervisor's private directory (0700, this user's), for the workers' metric files and
    peer sockets; ConfigError if TMPDIR is too long for the peer sockets' paths (a Unix socket's
    path holds at most ``MAX_UNIX_PATH_BYTES``): else every worker failed at its start, with a
    traceback, and the bridge exited 1."""
    runtime = Path(tempfile.mkdtemp(prefix="bali-zero-bridge-"))
    longest = len(os.fsencode(socket_path(runtime / "peers", workers - 1)))
    if longest > MAX_UNIX_PATH_BYTES:
        shutil.rmtree(runtime, ignore_errors=True)
        raise ConfigError(
            f"TMPDIR {tempfile.gettempdir()} is too long for the workers' Unix sockets "
            f"({longest} bytes, at most {MAX_UNIX_PATH_BYTES}): set TMPDIR to a shorter directory"
        )
    return runtime


def _supervise_in(runtime: Path, settings: Settings, environ: Mapping[str, str], host: str, port: int) -> int:
    from bridge.cli import listen_socket, listening_url

    try:
        (runtime / "metrics").mkdir()
        (runtime / "peers").mkdir()
        _preflight(settings)
    except ConfigError as exc:
        print(f"bali-zero-bridge: invalid configuration: {exc}", file=sys.stderr)
        return 2
    except (OSError, sqlite3.Error) as exc:
        print(f"bali-zero-bridge: cannot start: {exc}", file=sys.stderr)
        return 1
    sockets: list[socket.socket | None] = []
    try:
        for _ in range(settings.workers):
            sock = listen_socket(settings, host, port, reuse_port=True)
            sockets.append(sock)
            port = sock.getsockname()[1]  # port 0: the others join the port the first one got
            sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        for bound in sockets:
            if bound is not None:
                bound.close()
        print(f"bali-zero-bridge: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 1
    try:
        supervisor = Supervisor(
            settings,
            environ,
            sockets,
            runtime,
            listening_url(host, port),
            lambda: listen_socket(settings, host, port, reuse_port=True),
        )
        return asyncio.run(supervisor.run())
    finally:
        for current in sockets:  # the supervisor's current ones: it replaces a slot's socket in this list
            if current is not None:
                current.close()


def _preflight(settings: Settings) -> None:
    """Open (and create) the audit store and its key once, before any worker starts, so a bad store
    or key is one error from the parent, not N, and the workers never race to create the key."""
    from bridge.audit import AuditTrail

    trail = AuditTrail.from_settings(settings)
    trail.store.close()


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        environ: Mapping[str, str],
        sockets: list[socket.socket | None],
        runtime: Path,
        url: str,
        bind: Callable[[], socket.socket],
    ) -> None:
        """``sockets``: one per slot, bound to the port and listening; ``bind`` gives a fresh one
        (bound, not listening) for a slot whose socket was closed after a failed start."""
        self.settings = settings
        self.sockets = sockets
        self.bind = bind
        self.runtime = runtime
        self.url = url
        self.server_id = os.urandom(8).hex()
        # prometheus-client chooses multiprocess mode when it is imported, from this variable.
        self.environ = {**environ, "PROMETHEUS_MULTIPROC_DIR": str(runtime / "metrics")}
        self.workers: dict[int, Worker] = {}
        self.stopping = False
        self.changed = asyncio.Event()
        self.stopped = asyncio.Event()
        self.pending: set[asyncio.Task[None]] = set()
        self.backoff: dict[int, float] = {}
        """Per slot, the delay before the next start if the current one fails."""

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop, sig)
        for slot in range(self.settings.workers):
            await self.spawn(slot)
        first = await self.first_start()
        if first is not None:
            return first
        print(f"bali-zero-bridge listening on {self.url}", flush=True)
        while not self.stopping:
            self.changed.clear()
            exited = [w for w in self.workers.values() if w.process.returncode is not None]
            for worker in exited:
                del self.workers[worker.slot]
                self.replace(worker)
            if not exited:
                await self.changed.wait()
        return await self.drain()

    async def first_start(self) -> int | None:
        """None once every worker is ready; else stop the rest and give the failed one's status.

        A SIGTERM meanwhile ends the wait too (``stopped``): waiting on the workers alone, a stop
        that came before every worker was ready left the supervisor waiting for ever.
        """
        stop = asyncio.ensure_future(self.stopped.wait())
        pending: set[asyncio.Future[Any]] = {w.ready for w in self.workers.values()}
        try:
            while pending:
                done, pending = await asyncio.wait(pending | {stop}, return_when=asyncio.FIRST_COMPLETED)
                pending.discard(stop)
                if self.stopping or not all(f.result() for f in done if f is not stop):
                    break
            else:
                return None
        finally:
            stop.cancel()
        failed = [w for w in self.workers.values() if w.ready.done() and not w.ready.result()]
        self.stopping = True
        for worker in self.workers.values():
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGKILL if not worker.ready.done() else signal.SIGTERM)
        await asyncio.gather(*(w.process.wait() for w in self.workers.values()))
        if failed:
            code = failed[0].process.returncode or 1
            return code if code > 0 else 1
        return 0  # stopped by a signal while starting

    async def spawn(self, slot: int) -> Worker:
        """Start the worker of ``slot``; OSError if it cannot be (a socket, a pipe, a fork)."""
        listener = self.sockets[slot]
        if listener is None:
            listener = self.sockets[slot] = self.bind()
        parent_end, child_end = socket.socketpair()
        argv = [
            sys.executable,
            "-m",
            "bridge.workers.child",
            f"--fd={listener.fileno()}",
            f"--control-fd={child_end.fileno()}",
            f"--slot={slot}",
            f"--count={self.settings.workers}",
            f"--server-id={self.server_id}",
            f"--runtime-dir={self.runtime}",
        ]
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                env=self.environ,
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=(listener.fileno(), child_end.fileno()),
                start_new_session=True,
            )
        except BaseException:
            parent_end.close()
            raise
        finally:
            child_end.close()
        worker = Worker(slot, process, parent_end)
        self.workers[slot] = worker
        worker.watcher = asyncio.get_running_loop().create_task(self.watch(worker))
        if self.stopping:  # stopped while it was being started: the forwarded signal missed it
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGKILL)
        return worker

    async def watch(self, worker: Worker) -> None:
        """Resolve ``worker.ready`` from its control socket, then note its exit."""
        reader, writer = await asyncio.open_connection(sock=worker.control)
        try:
            line = await reader.readline()
            if not worker.ready.done():
                worker.ready.set_result(line == READY)
            if line == READY:
                await reader.read()  # nothing more comes: EOF when the worker exits
        finally:
            await worker.process.wait()
            if not worker.ready.done():
                worker.ready.set_result(False)
            writer.close()
            with contextlib.suppress(OSError):  # before its replacement starts: it takes the same files
                mark_process_dead(metric_files_id(worker.slot), str(self.runtime / "metrics"))  # type: ignore[no-untyped-call]
            self.changed.set()

    def replace(self, worker: Worker) -> None:
        """A worker exited while the server runs: log it and start another in its slot."""
        served = worker.ready.done() and worker.ready.result()
        if served:
            self.backoff[worker.slot] = 1.0
            how = "starting another in 0.0 s"
            self.start_later(worker.slot, 0.0)
        else:
            how = self.failed_start(worker.slot)
        log.error(
            "worker %d (pid %d) exited with status %s; %s",
            worker.slot,
            worker.process.pid,
            worker.process.returncode,
            how,
        )

    def failed_start(self, slot: int) -> str:
        """The worker of ``slot`` did not get to serve: close its socket, retry after the backoff."""
        sock, self.sockets[slot] = self.sockets[slot], None
        if sock is not None:
            sock.close()  # no connection waits on a slot that is not served (module docstring)
        delay = self.backoff.get(slot, 1.0)
        self.backoff[slot] = min(MAX_BACKOFF_S, delay * 2)
        self.start_later(slot, delay)
        return f"it never served; starting another in {delay:.1f} s"

    def start_later(self, slot: int, delay: float) -> None:
        async def respawn() -> None:
            await asyncio.sleep(delay)  # the backoff itself, not synchronisation
            if self.stopping:
                return
            try:
                await self.spawn(slot)
            except OSError as exc:
                log.error("worker %d could not be started (%s); %s", slot, exc, self.failed_start(slot))

        task = asyncio.get_running_loop().create_task(respawn())
        self.pending.add(task)  # referenced until done (see Worker.watcher)
        task.add_done_callback(self.pending.discard)

    def stop(self, sig: int) -> None:
        """SIGTERM/SIGINT: forward it to every worker (again on a repeat: end streams now)."""
        self.stopping = True
        self.stopped.set()
        for worker in self.workers.values():
            if worker.process.returncode is not None:
                continue
            ready = worker.ready.done() and worker.ready.result()
            # A worker still starting has no stream to drain, and a signal before uvicorn
            # handles them would be ignored (bridge/cli.py installs a no-op handler first).
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(sig if ready else signal.SIGKILL)
        self.changed.set()

    async def drain(self) -> int:
        """Wait for every worker to finish draining; 0 only if each exited 0."""
        for sock in self.sockets:
            if sock is not None:
                sock.close()  # new connections are refused once the workers closed theirs too
        workers = list(self.workers.values())
        await asyncio.gather(*(w.process.wait() for w in workers))
        failed = [w for w in workers if w.process.returncode != 0 and (w.ready.done() and w.ready.result())]
        for worker in failed:
            log.error(
                "worker %d (pid %d) exited with status %s", worker.slot, worker.process.pid, worker.process.returncode
            )
        return 1 if failed else 0
