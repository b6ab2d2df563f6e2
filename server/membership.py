"""Who is training: the registered workers and what the server knows of each."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from gapaware.common.results import PushResult
from gapaware.server.errors import UnknownWorker

IDS_PER_INCARNATION = 1_000_000
"""Worker ids of the n-th server incarnation (n restarts from checkpoints) start at
``n·IDS_PER_INCARNATION + 1``, so a worker of a crashed incarnation can never be mistaken for
one that joined the restarted server: its old id is simply unknown (join again)."""


def first_worker_id(incarnation: int) -> int:
    return incarnation * IDS_PER_INCARNATION + 1


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
    last_seq: int = 0                      # sequence number of the last push answered
    last_result: PushResult | None = None  # and its answer, replayed to a retried copy


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

    def silent_since(self, moment: float) -> list[int]:
        """Ids of the workers last heard from before ``moment`` (a ``time.monotonic()`` value)."""
        return [w.worker_id for w in self._workers.values() if w.last_seen < moment]

    def remove(self, worker_id: int) -> WorkerRecord:
        record = self._workers.pop(worker_id, None)
        if record is None:
            raise UnknownWorker(worker_id)
        return record

    def __iter__(self):
        return iter(list(self._workers.values()))

    def __len__(self) -> int:
        return len(self._workers)
