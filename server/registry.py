"""Who is training: the registered workers, their leases, their secrets, and exactly-once answers to
their pushes."""
from __future__ import annotations

import hmac
import itertools
import secrets
import time
from dataclasses import dataclass, field

from gapaware.common.results import PushResult
from gapaware.server.errors import BadPush, InvalidJoin, StaleSnapshot, UnknownWorker, WrongWorkerSecret

IDS_PER_INCARNATION = 1_000_000
"""Worker ids of the n-th server incarnation (n restarts from checkpoints) start at
``n·IDS_PER_INCARNATION + 1``, so a worker of a crashed incarnation can never be mistaken for
one that joined the restarted server: its old id is simply unknown (join again)."""


def first_worker_id(incarnation: int) -> int:
    return incarnation * IDS_PER_INCARNATION + 1


MAX_HOSTNAME_CHARS = 253
"""The longest hostname a Join may give: a DNS name's longest."""

MAX_DEVICE_CHARS = 64
"""The longest device a Join may give (``cuda:7``, ``mps``, ``cpu``)."""

SECRET_BYTES = 32
"""Length of the secret each worker is given at Join (:attr:`WorkerRecord.secret`)."""


def check_join_labels(hostname: str, device: str) -> None:
    """Refuses a hostname or device that no real worker sends: longer than its limit, or with control
    characters. Both are shown by ``status`` and written to the log, so they are checked before either."""
    for what, text, limit in (("hostname", hostname, MAX_HOSTNAME_CHARS), ("device", device, MAX_DEVICE_CHARS)):
        if len(text) > limit:
            raise InvalidJoin(f"the {what} has {len(text)} characters; at most {limit} are allowed")
        if not text.isprintable():
            raise InvalidJoin(f"the {what} holds control characters: give a plain name")


@dataclass
class WorkerRecord:
    worker_id: int
    hostname: str
    device: str
    joined_at: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    pulled_version: int | None = None      # the version it was last sent, until it pushes on it
    pushes: int = 0
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(SECRET_BYTES), repr=False)
    last_gap: float = 1.0
    last_seq: int = 0                      # sequence number of the last push answered
    last_result: PushResult | None = None  # and its answer, replayed to a retried copy
    observer: bool = False                 # pulls to evaluate, never pushes (`gapaware evaluate`)


class WorkerRegistry:
    """The table of live workers. Not thread-safe: the owner holds its lock.

    A push carries a per-worker sequence number ``seq`` (from 1, increasing; 0 turns the check off):
    a copy of the last push answered (a retry whose reply was lost) gets that answer again and
    changes nothing (:meth:`replay`); an older one is refused.
    """

    def __init__(self, first_id: int = 1) -> None:
        self._ids = itertools.count(first_id)
        self._workers: dict[int, WorkerRecord] = {}

    def add(self, hostname: str, device: str, observer: bool = False) -> WorkerRecord:
        record = WorkerRecord(next(self._ids), hostname, device, observer=observer)
        self._workers[record.worker_id] = record
        return record

    def get(self, worker_id: int) -> WorkerRecord:
        """The worker's record; hearing from it renews its lease."""
        record = self._workers.get(worker_id)
        if record is None:
            raise UnknownWorker(worker_id)
        record.last_seen = time.monotonic()
        return record

    def authenticate(self, worker_id: int, secret: bytes) -> None:
        """Refuses a call for ``worker_id`` that does not present its secret, comparing in constant time.

        Safe without the owner's lock: one dictionary lookup, atomic under the GIL, of a record whose
        secret never changes; it does not renew the lease (the call it admits does)."""
        record = self._workers.get(worker_id)
        if record is None:
            raise UnknownWorker(worker_id)
        if not hmac.compare_digest(record.secret, secret):
            raise WrongWorkerSecret(worker_id)

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

    @staticmethod
    def replay(record: WorkerRecord, seq: int) -> PushResult | None:
        """The answer to give again when push ``seq`` is a copy of the last one answered, None for a
        new push; refuses a push older than that."""
        if seq and seq == record.last_seq and record.last_result is not None:
            return record.last_result
        if seq and seq < record.last_seq:
            raise BadPush(f"push {seq} of worker {record.worker_id} is older than its push {record.last_seq} "
                          "already answered: nothing applied")
        return None

    @staticmethod
    def check_base(record: WorkerRecord, base_version: int, version: int) -> None:
        """Refuses a new push whose gradient was not computed on what the server last sent its worker,
        and any push of an observer."""
        if record.observer:
            raise BadPush(f"worker {record.worker_id} joined as an observer, to evaluate: it does not push")
        if base_version > version:
            raise BadPush(f"base version {base_version} is ahead of the server's version {version}: "
                          "the gradient was computed on parameters this server never sent")
        if record.pulled_version != base_version:
            sent = "nothing since its last push" if record.pulled_version is None else f"version {record.pulled_version}"
            raise StaleSnapshot(f"gradient computed on version {base_version} but worker {record.worker_id} was "
                                f"last sent {sent}: pull, then push a gradient computed on what was pulled")

    @staticmethod
    def answered(record: WorkerRecord, seq: int, result: PushResult) -> None:
        """Remembers the answer to push ``seq``, for a retried copy of it."""
        if seq:
            record.last_seq, record.last_result = seq, result
