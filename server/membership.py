"""Who is training: the registered workers and what the server knows of each."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from gapaware.server.errors import UnknownWorker


@dataclass
class WorkerRecord:
    worker_id: int
    hostname: str
    device: str
    joined_at: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    pulled_version: int | None = None
    pushes: int = 0
    last_gap: float = 1.0


class Membership:
    """The table of live workers. Not thread-safe: the owner holds its lock."""

    def __init__(self, first_id: int = 1) -> None:
        self._ids = itertools.count(first_id)
        self._workers: dict[int, WorkerRecord] = {}

    def add(self, hostname: str, device: str) -> WorkerRecord:
        record = WorkerRecord(next(self._ids), hostname, device)
        self._workers[record.worker_id] = record
        return record

    def get(self, worker_id: int) -> WorkerRecord:
        record = self._workers.get(worker_id)
        if record is None:
            raise UnknownWorker(worker_id)
        record.last_seen = time.monotonic()
        return record

    def remove(self, worker_id: int) -> WorkerRecord:
        record = self._workers.pop(worker_id, None)
        if record is None:
            raise UnknownWorker(worker_id)
        return record

    def __iter__(self):
        return iter(list(self._workers.values()))

    def __len__(self) -> int:
        return len(self._workers)
