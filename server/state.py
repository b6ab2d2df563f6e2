"""The parameter server, free of gRPC: one lock around the workers, the model and the updater.

:class:`ParameterServerState` is what the servicer, the simulator and the tests drive. Each concern
lives in a module of its own: who is training (:mod:`~gapaware.server.registry`), θ and the workers'
θ⁽ⁱ⁾ (:mod:`~gapaware.server.model_store`), how a push changes θ (:mod:`~gapaware.server.updater`).
A push arrives checked (:class:`~gapaware.server.push.AdmittedPush`); receiving it, the slow part,
happens outside the lock, in the servicer.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time

import torch

from gapaware.common.buffers import checksum, pack_buffers, unpack_buffers
from gapaware.common.codecs import Codec
from gapaware.common.config import RunConfig
from gapaware.common.layout import ParamLayout
from gapaware.common.results import PushResult
from gapaware.common.shards import Shard, run_identity
from gapaware.server.checkpoint import Checkpoint, CheckpointHealth
from gapaware.server.errors import InvalidLayout, LayoutMismatch, TooManyWorkers
from gapaware.server.limits import DEFAULT_MAX_WORKERS
from gapaware.server.model_store import ModelStore, Outgoing
from gapaware.server.push import AdmittedPush, admit
from gapaware.server.policies import ElementRates
from gapaware.server.registry import WorkerRecord, WorkerRegistry, check_join_labels, first_worker_id
from gapaware.server.updater import Updater, Window

log = logging.getLogger("gapaware.server")


class ParameterServerState:
    def __init__(self, config: RunConfig, layout: ParamLayout, theta: torch.Tensor, train_size: int, *,
                 nonfinite: str = "reject", grad_norm_bound: float = 0.0, buffers: bytes = b"",
                 max_workers: int = DEFAULT_MAX_WORKERS, shard: Shard = Shard(),
                 rates: ElementRates | None = None) -> None:
        if theta.dim() != 1 or theta.numel() != layout.numel or theta.dtype != torch.float32:
            raise ValueError(f"theta must be a flat float32 tensor of {layout.numel} elements")
        self.config = config
        self.layout = layout
        self.shard = shard  # the slice of the model ``layout`` is (gapaware.common.shards)
        self.train_size = train_size
        self.model = ModelStore(theta, getattr(torch, config.snapshot_dtype), config.full_pull_every)
        self.model.buffers = (buffers, checksum(buffers))
        unpack_buffers(*self.model.buffers, layout.buffers)  # refuses buffers that do not fit the layout
        self.updater = Updater(config, layout, config.total_updates(train_size), nonfinite, grad_norm_bound, rates)
        self.checkpoint_health = CheckpointHealth()
        self.workers = WorkerRegistry()
        self.max_workers = max_workers
        self.finished = False
        self.incarnation = 0
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        # The versions threads wait for in wait_for_version: a push wakes them only once one is reached,
        # rather than costing every push a thread switch.
        self._awaited_versions: list[float] = []

    # The run's progress, read without the lock (each is one attribute read).
    @property
    def theta(self) -> torch.Tensor:
        return self.model.theta

    @property
    def policy(self):
        return self.updater.policy

    @property
    def version(self) -> int:
        return self.updater.version

    @property
    def samples(self) -> int:
        return self.updater.samples

    @property
    def total_updates(self) -> int:
        return self.updater.total_updates

    @property
    def nonfinite_pushes(self) -> int:
        return self.updater.nonfinite_pushes

    @property
    def max_samples(self) -> int:
        """The most examples one push may claim: a batch is drawn without replacement from the
        training set, so no honest push holds more (at least the run's batch size)."""
        return max(self.train_size, self.config.batch_size)

    def lr(self) -> float:
        return self.updater.lr()

    def grad_norm_limit(self) -> float:
        """The largest gradient norm a push may have now; NaN without a bound."""
        return math.nan if self.updater.bound is None else self.updater.bound.limit()

    def epoch(self) -> float:
        return self.samples / self.train_size if self.train_size else 0.0

    # -- membership -------------------------------------------------------------------------
    def join(self, hostname: str, device: str, layout: ParamLayout | None, *, fingerprint: str = "",
             run_config_sha256: str = "", observer: bool = False) -> WorkerRecord:
        """Registers a worker, up to :attr:`max_workers` at once. ``layout`` and its claimed ``fingerprint``
        (either may be absent) must agree with each other and with the server's layout; ``hostname`` and
        ``device`` must be plain names of bounded length (:func:`check_join_labels`); ``run_config_sha256``,
        when given, must be this run's (:func:`gapaware.common.shards.run_identity`). An ``observer`` only
        pulls, to evaluate: it is sent θ itself and keeps no snapshot."""
        check_join_labels(hostname, device)
        if run_config_sha256 and run_config_sha256 != run_identity(self.config):
            raise LayoutMismatch(f"this server (shard {self.shard}) runs another run than the worker's shard 0: "
                                 "their run configs differ (task, policy, seed, ...); start every shard with "
                                 "the same run flags")
        if fingerprint and layout is not None and fingerprint != layout.fingerprint:
            raise InvalidLayout(f"the layout's fingerprint {fingerprint[:16]}... is not that of the {len(layout.names)} "
                                "parameters it lists: the message is corrupt or was built by other code")
        if layout is not None:
            mismatch = self.layout.describe_mismatch(layout)
            if mismatch:
                hint = (f"; this server is shard {self.shard} of a sharded run: give the worker every shard, "
                        "in order (--server H0:P0,H1:P1,...)" if self.shard.count > 1 else "")
                raise LayoutMismatch(f"the worker's model does not match the server's (task "
                                     f"{self.config.task!r}): {mismatch}{hint}")
        elif fingerprint and fingerprint != self.layout.fingerprint:
            raise LayoutMismatch(f"the worker's model does not match the server's (task {self.config.task!r}): "
                                 f"layout fingerprint {fingerprint[:16]}..., the server's is "
                                 f"{self.layout.fingerprint[:16]}...")
        with self._lock:
            if len(self.workers) >= self.max_workers:
                raise TooManyWorkers(self.max_workers)
            record = self.workers.add(hostname, device, observer)
        log.info("%s %d joined from %s (%s)", "observer" if observer else "worker", record.worker_id, hostname, device)
        return record

    def leave(self, worker_id: int) -> WorkerRecord:
        with self._lock:
            record = self.workers.remove(worker_id)
            self._forget(worker_id)
        log.info("worker %d left after %d pushes", worker_id, record.pushes)
        return record

    def reap(self, lease_seconds: float) -> list[WorkerRecord]:
        """Forgets the workers not heard from (join, pull, push, heartbeat) for ``lease_seconds``:
        their records, θ⁽ⁱ⁾ and per-worker policy state. Returns their records."""
        with self._lock:
            expired = self.workers.silent_since(time.monotonic() - lease_seconds)
            for worker_id in expired:
                self._forget(worker_id)
            return [self.workers.remove(worker_id) for worker_id in expired]

    def _forget(self, worker_id: int) -> None:
        self.model.forget(worker_id)
        self.policy.forget_worker(worker_id)

    def authenticate(self, worker_id: int, secret: bytes) -> None:
        """Refuses a call for ``worker_id`` that does not present the secret it was given at Join
        (:meth:`WorkerRegistry.authenticate`, which needs no lock: the event loop calls this and never
        waits for an update in progress)."""
        self.workers.authenticate(worker_id, secret)

    def heartbeat(self, worker_id: int) -> bool:
        with self._lock:
            self.workers.get(worker_id)
            return self.finished

    def live_workers(self) -> list[WorkerRecord]:
        with self._lock:
            return list(self.workers)

    # -- the update path --------------------------------------------------------------------
    def pull(self, worker_id: int, dtype: torch.dtype = torch.float32) -> tuple[int, torch.Tensor]:
        """The version and what ``worker_id`` is sent, in the transport ``dtype``: a tensor nobody
        modifies afterwards. For policies that measure a Gap it is kept as the worker's θ⁽ⁱ⁾."""
        version, sent = self.pull_to_send(worker_id, dtype)
        return version, sent.tensor

    def pull_to_send(self, worker_id: int, dtype: torch.dtype | Codec, delta_base: int = 0) -> tuple[int, Outgoing]:
        """The version and what ``worker_id`` is sent: as :meth:`pull` for a transport dtype; for a
        codec, a delta pull (:meth:`ModelStore.delta_pull`) from the parameters ``delta_base`` names."""
        with self._lock:
            record = self.workers.get(worker_id)
            if record.observer:
                plain = torch.float32 if isinstance(dtype, Codec) else dtype  # a full pull, never a delta
                return self.version, self.model.sent_copy(worker_id, self.theta, plain, keep_snapshot=False)
            parameters = self.theta if self.policy.pulls_theta else \
                self.policy.pull_view(self.theta, lr=self.lr(), worker_id=worker_id)
            if isinstance(dtype, Codec):
                sent = self.model.delta_pull(worker_id, parameters, dtype, delta_base)
            else:
                sent = self.model.sent_copy(worker_id, parameters, dtype, keep_snapshot=self.policy.needs_snapshot)
            record.pulled_version = self.version
            return self.version, sent

    def admit(self, worker_id: int, grad: torch.Tensor, *, base_version: int, **details) -> AdmittedPush:
        """A push of ``grad`` checked against this server's model and run (:func:`gapaware.server.push.admit`)."""
        return admit(worker_id, grad, numel=self.layout.numel, max_samples=self.max_samples,
                     base_version=base_version, **details)

    def check_push(self, worker_id: int, base_version: int, seq: int = 0) -> None:
        """Refuses, before any of its gradient is received, a push that :meth:`push` would refuse
        whatever the gradient: unknown worker, base version from the future, stale snapshot. A retry
        of the push answered last passes: :meth:`push` answers it again."""
        with self._lock:
            record = self.workers.get(worker_id)
            if self.workers.replay(record, seq) is None:
                self.workers.check_base(record, base_version, self.version)

    def push(self, push: AdmittedPush) -> PushResult:
        """Applies ``push`` with the run's policy; exactly once per ``seq`` (a retried copy of the
        last push answered gets its answer again, with ``applied=False``). The push's gradient is
        the server's from then on: an update may leave other values in it."""
        norm = self.updater.measure(push)  # a pass over the gradient, outside the lock
        with self._lock:
            record = self.workers.get(push.worker_id)
            answered = self.workers.replay(record, push.seq)
            if answered is not None:
                return dataclasses.replace(answered, finished=self.finished, applied=False)
            self.workers.check_base(record, push.base_version, self.version)
            result = self._apply(record, push, norm)
            self.workers.answered(record, push.seq, result)
            return result

    def _apply(self, record: WorkerRecord, push: AdmittedPush, norm: float) -> PushResult:
        """A new push of a worker that may push, under the lock."""
        staleness = self.version - push.base_version
        dropped = PushResult(self.version, staleness, 1.0, self.finished, False)
        if self.finished or self.version >= self.total_updates or self.updater.drops(push, norm):
            return dropped
        stale_theta, used_up = self.model.take_snapshot(record.worker_id)
        backup = self.model.spare()
        try:
            applied = self.updater.apply(self.theta, push, stale_theta if self.policy.needs_snapshot else None,
                                         norm, backup)
        finally:
            if used_up:
                self.model.recycle(stale_theta)
            self.model.recycle(backup)
        if applied is None:
            return dropped
        staleness, gap = applied
        if push.buffers is not None:
            self.model.buffers = (push.buffers, push.buffers_crc32c)
        record.pulled_version = None
        record.pushes += 1
        record.last_gap = gap
        if self._reached_end():
            self.finished = True
        if self.finished or any(self.version >= awaited for awaited in self._awaited_versions):
            self._changed.notify_all()
        return PushResult(self.version, staleness, gap, self.finished, True)

    def _reached_end(self) -> bool:
        """Whether this server ends the run by itself: shard 0 (or the only server) at the run's last
        update. A later shard applies no push past it but serves on until told the run ended
        (:meth:`finish`, at a worker's Leave): it may have reached the end first only because shard 0
        restarted from an older checkpoint and still needs pushes."""
        return self.shard.index == 0 and self.version >= self.total_updates

    # -- observation ------------------------------------------------------------------------
    def parameters(self) -> tuple[int, torch.Tensor]:
        """A copy of the current parameters and their version, for evaluation."""
        with self._lock:
            return self.version, self.theta.clone()

    def buffers(self) -> tuple[bytes, int]:
        """The model's buffers as they travel, and their CRC-32C (one attribute read: no lock)."""
        return self.model.buffers

    def buffer_tensors(self) -> dict[str, torch.Tensor]:
        """The model's buffers by name, as new tensors."""
        return unpack_buffers(*self.buffers(), self.layout.buffers)

    def take_window(self) -> dict:
        """Means over the pushes since the previous call, and how many pushes had each staleness."""
        with self._lock:
            window = self.updater.take_window()
        return {**window.means(), "staleness_counts": window.staleness_counts}

    def totals(self) -> dict[str, float]:
        """The run so far: pushes applied and their mean staleness, Gap and training loss."""
        with self._lock:
            totals = self.updater.totals
            return {"pushes": totals.pushes, **{f"run_{k}": v for k, v in totals.means().items()}}

    def wait_for_version(self, version: int, timeout: float) -> int:
        """Blocks until the version reaches ``version``, the run finishes or ``timeout`` passes."""
        with self._lock:
            self._awaited_versions.append(version)
            try:
                self._changed.wait_for(lambda: self.version >= version or self.finished, timeout)
            finally:
                self._awaited_versions.remove(version)
            return self.version

    def finish(self) -> None:
        with self._lock:
            self.finished = True
            self._changed.notify_all()

    def snapshot_bytes(self) -> int:
        """Memory held by the workers' θ⁽ⁱ⁾ (policies with a Gap only)."""
        with self._lock:
            return self.model.held_bytes()

    def held_snapshots(self) -> int:
        """Parameter snapshots θ⁽ⁱ⁾ held for workers (at most one per live worker)."""
        with self._lock:
            return self.model.held()

    # -- crash safety -----------------------------------------------------------------------
    def checkpoint(self) -> Checkpoint:
        """A consistent copy of what a restarted server needs. Only the copy of θ and of the
        policy state happens under the lock; writing it to disk is the caller's, outside."""
        with self._lock:
            return Checkpoint(version=self.version, samples=self.samples, incarnation=self.incarnation,
                              config=self.config, theta=self.theta.clone(),
                              policy_state=self.policy.state_dict(),
                              totals=dataclasses.asdict(self.updater.totals),
                              push_norms=tuple(self.updater.bound.recent()) if self.updater.bound else (),
                              buffers=self.buffer_tensors(), shard=self.shard, layout=self.layout)

    def restore(self, checkpoint: Checkpoint, incarnation: int) -> None:
        """Continues the run saved in ``checkpoint`` as server incarnation ``incarnation``.

        θ, the version, the examples seen, the run's totals and the policy state (momentum, GA's
        ``v``, ``k`` and ``η_max``) are restored. Per-worker policy state (DANA's buffers ``vⁱ``) is
        then dropped, exactly as when a worker leaves: the workers of the crashed server re-join
        under new ids, so a buffer of an old id would never be pushed to again, yet would stay in
        the look-ahead's ``Σⱼ vʲ`` forever. Snapshots are not saved: every worker pulls afresh.
        Raises ``ValueError`` when the checkpoint does not fit this run's model or policy.
        """
        if checkpoint.shard != self.shard:
            raise ValueError(f"the checkpoint is of shard {checkpoint.shard} (I/S) of its run, this server was started "
                             f"as shard {self.shard}: give --shard {checkpoint.shard}, or resume that shard's own "
                             "checkpoint directory")
        if checkpoint.theta.shape != self.theta.shape:
            raise ValueError(f"the checkpoint holds {checkpoint.theta.numel()} parameters, the model of task "
                             f"{self.config.task!r} has {self.theta.numel()}")
        missing = [b.name for b in self.layout.buffers if b.name not in checkpoint.buffers]
        if missing:
            raise ValueError(f"the checkpoint holds no buffers {missing} of the model of task {self.config.task!r}")
        with self._lock:
            self.policy.load_state_dict(checkpoint.policy_state)
            for worker_id in self.policy.worker_ids():
                self.policy.forget_worker(worker_id)
            self.theta.copy_(checkpoint.theta)
            if self.layout.buffers:
                data = pack_buffers(checkpoint.buffers, self.layout.buffers)
                self.model.buffers = (data, checksum(data))
            self.updater.version = checkpoint.version
            self.updater.samples = checkpoint.samples
            self.updater.totals = Window(**checkpoint.totals)
            if self.updater.bound is not None:
                self.updater.bound.load(checkpoint.push_norms)
            self.incarnation = incarnation
            self.workers = WorkerRegistry(first_id=first_worker_id(incarnation))
            self.finished = self._reached_end()
