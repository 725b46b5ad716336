"""The writer's inbox: a bounded queue of events plus an unbounded lane for control tasks.

Why not ``queue.Queue``: a flush or shutdown marker must get in even when the queue is full of
events (otherwise ``aclose`` would block, or drop its own marker, exactly under overload), and it
must be ordered after every event accepted before it, so "flushed" really means written.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from bridge.audit.events import AuditEvent


@dataclass(slots=True)
class Task:
    """Work for the writer thread, run after all events queued before it are written."""

    run: Callable[[], Any] | None = None
    stop: bool = False
    future: Future[Any] = field(default_factory=Future)


class Inbox:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: deque[AuditEvent | Task] = deque()
        self._events = 0
        self._closed = False
        self._cond = threading.Condition(threading.Lock())

    def offer(self, event: AuditEvent) -> bool:
        """Queue an event unless full or closed; O(1) and never waits beyond a short lock.

        It does not wake the writer, which looks every few milliseconds instead: waking it made
        the writer thread take the GIL (and the core) right after a stream's start was recorded,
        in the very moments that stream's first token was being read and written. Tasks (flush,
        close) still wake it at once.
        """
        with self._cond:
            if self._closed or self._events >= self.capacity:
                return False
            self._items.append(event)
            self._events += 1
            return True

    def submit(self, task: Task, *, close: bool = False) -> None:
        """Queue a control task regardless of capacity; ``close`` refuses all later events."""
        with self._cond:
            self._closed = self._closed or close
            self._items.append(task)
            self._cond.notify()

    def submit_unless_closed(self, task: Task) -> bool:
        """Queue a task only while open: a task queued after the stop marker would never run."""
        with self._cond:
            if self._closed:
                return False
            self._items.append(task)
            self._cond.notify()
            return True

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return self._events

    def take(self, max_events: int, timeout: float | None) -> tuple[list[AuditEvent], Task | None]:
        """Wait up to ``timeout`` for work; return queued events up to the first task, and that task."""
        with self._cond:
            if not self._items:
                self._cond.wait(timeout)
            events: list[AuditEvent] = []
            while self._items and len(events) < max_events:
                item = self._items.popleft()
                if isinstance(item, Task):
                    self._events -= len(events)
                    return events, item
                events.append(item)
            self._events -= len(events)
            return events, None
