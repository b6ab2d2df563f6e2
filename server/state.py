"""The parameter server's state: parameters, version, policy, membership and progress.

Everything here is plain Python and torch, free of gRPC, so it can be driven by the
servicer, the simulator and the tests alike. One lock makes every update atomic;
receiving a gradient (the slow part) happens outside it, in the servicer.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from dataclasses import dataclass, field

import torch

from gapaware.common.choices import NONFINITE_ACTIONS
from gapaware.common.config import RunConfig, learning_rate
from gapaware.common.layout import ParamLayout
from gapaware.common.results import PushResult
from gapaware.server.checkpoint import Checkpoint
from gapaware.server.errors import BadPush, InvalidLayout, LayoutMismatch, NonFiniteGradient, StaleSnapshot
from gapaware.server.membership import Membership, WorkerRecord, first_worker_id
from gapaware.server.policies import Policy, make_policy
from gapaware.server.sent import Loan, SentParameters

log = logging.getLogger("gapaware.server")


@dataclass
class Window:
    """Sums over the pushes applied since the last evaluation."""

    pushes: int = 0
    staleness: float = 0.0
    gap: float = 0.0
    loss: float = 0.0
    staleness_counts: list[int] = field(default_factory=list)  # [i]: pushes of staleness i

    def add(self, staleness: int, gap: float, loss: float) -> None:
        self.pushes += 1
        self.staleness += staleness
        self.gap += gap
        self.loss += loss
        if staleness >= len(self.staleness_counts):
            self.staleness_counts.extend([0] * (staleness + 1 - len(self.staleness_counts)))
        self.staleness_counts[staleness] += 1

    def means(self) -> dict[str, float]:
        n = max(1, self.pushes)
        return {"mean_staleness": self.staleness / n, "mean_gap": self.gap / n, "train_loss": self.loss / n}


def policy_for(config: RunConfig, numel: int) -> Policy:
    """The policy object ``config`` names, with the run's hyper-parameters."""
    return make_policy(config.policy, numel, momentum=config.momentum, nesterov=config.nesterov,
                       weight_decay=config.weight_decay, ga_beta=config.ga_beta, ga_eps=config.ga_eps)


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no element is NaN or ±Inf.

    A NaN or an infinity makes the sum NaN or infinite, so a finite sum proves every element
    finite in one streaming pass with no temporary. ``torch.isfinite(t).all()`` builds several
    tensors of the input's size: on 25 M elements 133 ms against 5.5 ms for the sum, most of it
    the kernel zeroing fresh pages. Only a non-finite sum (a bad gradient, or finite elements
    whose float32 sum overflows) pays for the exact element-wise test.
    """
    return math.isfinite(tensor.sum().item()) or bool(torch.isfinite(tensor).all())


class ParameterServerState:
    def __init__(self, config: RunConfig, layout: ParamLayout, theta: torch.Tensor, train_size: int, *,
                 nonfinite: str = "reject") -> None:
        if theta.dim() != 1 or theta.numel() != layout.numel or theta.dtype != torch.float32:
            raise ValueError(f"theta must be a flat float32 tensor of {layout.numel} elements")
        if nonfinite not in NONFINITE_ACTIONS:
            raise ValueError(f"Invalid non-finite action: {nonfinite!r} (choose from {', '.join(NONFINITE_ACTIONS)})")
        self.nonfinite = nonfinite
        self.nonfinite_pushes = 0
        self.config = config
        self.layout = layout
        self.theta = theta
        self.policy = policy_for(config, layout.numel)
        self.train_size = train_size
        self.total_updates = config.total_updates(train_size)
        self.version = 0
        self.samples = 0
        self.finished = False
        self.incarnation = 0
        self.members = Membership()
        self.started = time.monotonic()
        self._sent = SentParameters(theta)
        self._snapshot_dtype = getattr(torch, config.snapshot_dtype)
        self._window = Window()
        self._totals = Window()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        # The versions that threads in wait_for_version wait for: a push wakes them only once one
        # is reached. Waking them on every push (the evaluator and the checkpointer wait for the whole
        # run) cost each push a thread switch away from the event loop's thread.
        self._awaited_versions: list[float] = []

    # -- membership -------------------------------------------------------------------------
    def join(self, hostname: str, device: str, layout: ParamLayout | None, *, fingerprint: str = "") -> WorkerRecord:
        """Registers a worker. ``layout`` and its claimed ``fingerprint`` (either may be absent) must
        agree with each other and with the server's layout."""
        if fingerprint and layout is not None and fingerprint != layout.fingerprint:
            raise InvalidLayout(f"the layout's fingerprint {fingerprint[:16]}... is not that of the {len(layout.names)} "
                                "parameters it lists: the message is corrupt or was built by other code")
        if layout is not None:
            mismatch = self.layout.describe_mismatch(layout)
            if mismatch:
                raise LayoutMismatch(f"the worker's model does not match the server's (task "
                                     f"{self.config.task!r}): {mismatch}")
        elif fingerprint and fingerprint != self.layout.fingerprint:
            raise LayoutMismatch(f"the worker's model does not match the server's (task {self.config.task!r}): "
                                 f"layout fingerprint {fingerprint[:16]}..., the server's is "
                                 f"{self.layout.fingerprint[:16]}...")
        with self._lock:
            record = self.members.add(hostname, device)
        log.info("worker %d joined from %s (%s)", record.worker_id, hostname, device)
        return record

    def leave(self, worker_id: int) -> WorkerRecord:
        with self._lock:
            record = self.members.remove(worker_id)
            self._forget(worker_id)
        log.info("worker %d left after %d pushes", worker_id, record.pushes)
        return record

    def reap(self, lease_seconds: float) -> list[WorkerRecord]:
        """Forgets the workers not heard from (join, pull, push, heartbeat) for ``lease_seconds``:
        their records, parameter snapshots and per-worker policy state. Returns their records."""
        with self._lock:
            expired = self.members.silent_since(time.monotonic() - lease_seconds)
            for worker_id in expired:
                self._forget(worker_id)
            return [self.members.remove(worker_id) for worker_id in expired]

    def _forget(self, worker_id: int) -> None:
        self._sent.forget(worker_id)
        self.policy.forget_worker(worker_id)

    def heartbeat(self, worker_id: int) -> bool:
        with self._lock:
            self.members.get(worker_id)
            return self.finished

    # -- the update path --------------------------------------------------------------------
    def lr(self) -> float:
        return learning_rate(self.config, self.version, self.total_updates)

    def pull(self, worker_id: int, *, lend: bool = False,
             dtype: torch.dtype = torch.float32) -> tuple[int, torch.Tensor | Loan]:
        """What ``worker_id`` is sent, in ``dtype`` (the transport dtype): the version and a tensor
        nobody modifies afterwards.

        For policies that measure a Gap the worker's θ⁽ⁱ⁾ is kept: in float32, or in bfloat16 with
        ``snapshot_dtype="bfloat16"`` (half the memory; the Gap is then measured against θ⁽ⁱ⁾
        rounded to bfloat16, as ALGORITHMS.md allows). A float32 θ⁽ⁱ⁾ is θ itself until θ next
        changes (:mod:`gapaware.server.sent`); a reduced-dtype pull casts θ once, straight into the
        tensor sent, which is also the θ⁽ⁱ⁾ when that has the same dtype.

        With ``lend=True`` the pull is lent instead, as a :class:`~gapaware.server.sent.Loan` that the
        caller reads while it sends it and then hands back with :meth:`give_back`. A float32 loan
        reads θ itself, with no copy, for as long as θ stays as it was sent.
        """
        with self._lock:
            record = self.members.get(worker_id)
            snapshot_dtype = self._snapshot_dtype if self.policy.needs_snapshot else None
            view = self.theta if self.policy.pulls_theta else \
                self.policy.pull_view(self.theta, lr=self.lr(), worker_id=worker_id)
            snapshot = None if snapshot_dtype is None else view if snapshot_dtype == torch.float32 else \
                self._cast(view, snapshot_dtype, reuse=lend or snapshot_dtype != dtype)
            sent = view if dtype == torch.float32 else snapshot if snapshot is not None and snapshot.dtype == dtype \
                else self._cast(view, dtype, reuse=lend)
            if not lend and sent is self.theta:  # the caller keeps it, and θ changes: a copy, its θ⁽ⁱ⁾ too
                sent = self.theta.clone()
                snapshot = sent if snapshot is self.theta else snapshot
            record.pulled_version = self.version
            if snapshot is not None:
                self._sent.keep(worker_id, snapshot)
            if view is not sent and view is not self.theta:  # DANA's θ̂, only cast from: the server's own
                self._sent.recycle(view)
            return self.version, self._sent.lend(sent) if lend else sent

    def _cast(self, source: torch.Tensor, dtype: torch.dtype, *, reuse: bool) -> torch.Tensor:
        """``source`` in ``dtype``. With ``reuse`` it is written into a spare tensor of that dtype when
        there is one, and is the server's own (:meth:`SentParameters.adopt`): reused once nobody holds
        it. Without, it is a new tensor, for a caller that keeps it."""
        if not reuse:
            return source.to(dtype)
        spare = self._sent.spare(dtype)
        cast = source.to(dtype) if spare is None else spare.copy_(source)
        self._sent.adopt(cast)
        return cast

    def gradient_buffer(self) -> torch.Tensor:
        """A float32 tensor of θ's size to receive a gradient into: a spare of the tensors the server
        sends (:mod:`gapaware.server.sent`), or a new one. :meth:`recycle` it once applied."""
        return self._sent.buffer()

    def recycle(self, buffer: torch.Tensor) -> None:
        """A buffer from :meth:`gradient_buffer` is applied and nobody reads it any more: a spare."""
        self._sent.recycle(buffer)

    def give_back(self, loan: Loan) -> None:
        """The caller of ``pull(lend=True)`` no longer reads ``loan``. Takes no lock of the update
        path, so the event loop can call it."""
        self._sent.give_back(loan)

    def check_push(self, worker_id: int, base_version: int, seq: int = 0) -> None:
        """Refuses, before any of its gradient is received, a push that :meth:`push` would refuse
        whatever the gradient: unknown worker, base version from the future, stale snapshot. A
        retry of the push answered last (same ``seq``) passes: :meth:`push` answers it again."""
        with self._lock:
            record = self.members.get(worker_id)
            if not (seq and seq == record.last_seq and record.last_result is not None):
                self._check_push(record, base_version)

    def _check_push(self, record: WorkerRecord, base_version: int) -> None:
        if base_version > self.version:
            raise BadPush(f"base version {base_version} is ahead of the server's version {self.version}: "
                          "the gradient was computed on parameters this server never sent")
        if record.pulled_version != base_version:
            sent = "nothing since its last push" if record.pulled_version is None else f"version {record.pulled_version}"
            raise StaleSnapshot(f"gradient computed on version {base_version} but worker {record.worker_id} was "
                                f"last sent {sent}: pull, then push a gradient computed on what was pulled")

    def push(self, worker_id: int, grad: torch.Tensor, *, base_version: int, samples: int = 0,
             loss: float = math.nan, seq: int = 0, finite: bool | None = None, spare_grad: bool = False) -> PushResult:
        """Applies ``grad``, computed by ``worker_id`` on ``base_version``, with the run's policy.

        ``seq`` (from 1, increasing per worker; 0 turns the check off) makes the push exactly-once:
        a copy of the last push answered (a retry whose reply was lost) gets that push's answer
        again with ``applied=False`` and changes nothing; an older one is refused.

        A gradient with NaN or Inf elements changes nothing: it is refused (``nonfinite="reject"``)
        or acknowledged with ``applied=False`` (``"skip"``), and counted in :attr:`nonfinite_pushes`.
        ``finite`` says whether ``grad`` is free of them when the caller checked already (the
        servicer does, chunk by chunk as they arrive); None checks here.

        ``spare_grad`` (``grad`` is a buffer of :meth:`gradient_buffer`) is accepted from the servicer
        and no longer used: the policies only read ``grad``. :meth:`recycle` it afterwards, as always.
        """
        if grad.shape != self.theta.shape:
            raise BadPush(f"gradient has {grad.numel()} elements, the model has {self.theta.numel()}")
        if finite is None:
            finite = all_finite(grad)
        with self._lock:
            record = self.members.get(worker_id)
            if seq and seq == record.last_seq and record.last_result is not None:
                return dataclasses.replace(record.last_result, finished=self.finished, applied=False)
            if seq and seq < record.last_seq:
                raise BadPush(f"push {seq} of worker {worker_id} is older than its push {record.last_seq} "
                              "already answered: nothing applied")
            result = self._apply(record, grad, base_version=base_version, samples=samples, loss=loss,
                                 finite=finite)
            if seq:
                record.last_seq, record.last_result = seq, result
            return result

    def _apply(self, record: WorkerRecord, grad: torch.Tensor, *, base_version: int, samples: int,
               loss: float, finite: bool) -> PushResult:
        """The push of a new ``seq``, under the lock."""
        worker_id = record.worker_id
        self._check_push(record, base_version)
        if self.finished:
            return PushResult(self.version, self.version - base_version, 1.0, True, False)
        if not finite:
            self.nonfinite_pushes += 1
            if self.nonfinite == "reject":
                bad = int((~torch.isfinite(grad)).sum())
                raise NonFiniteGradient(
                    f"gradient has {bad} NaN or Inf elements (of {grad.numel()}): nothing was applied; "
                    "lower the learning rate or clip gradients, or start the server with --nonfinite skip")
            if self.nonfinite == "skip":
                return PushResult(self.version, self.version - base_version, 1.0, False, False)
        staleness = self.version - base_version
        stale_theta = self._sent.take(worker_id)
        self._sent.detach()  # the replies and other workers' θ⁽ⁱ⁾ still reading θ get a copy first
        try:
            gap = self.policy.apply(self.theta, grad, lr=self.lr(), staleness=staleness, stale_theta=stale_theta,
                                    worker_id=worker_id)
        finally:
            if stale_theta is not None:
                self._sent.release(stale_theta)
        record.pulled_version = None
        record.pushes += 1
        record.last_gap = gap
        self.version += 1
        self.samples += samples
        self._window.add(staleness, gap, loss)
        self._totals.add(staleness, gap, loss)
        if self.version >= self.total_updates:
            self.finished = True
        if self.finished or any(self.version >= awaited for awaited in self._awaited_versions):
            self._changed.notify_all()
        return PushResult(self.version, staleness, gap, self.finished, True)

    # -- observation ------------------------------------------------------------------------
    def parameters(self) -> tuple[int, torch.Tensor]:
        """A copy of the current parameters and their version, for evaluation."""
        with self._lock:
            return self.version, self.theta.clone()

    def take_window(self) -> dict:
        """Means over the pushes since the previous call, and how many pushes had each staleness."""
        with self._lock:
            window, self._window = self._window, Window()
        return {**window.means(), "staleness_counts": window.staleness_counts}

    def totals(self) -> dict[str, float]:
        """The run so far: pushes applied and their mean staleness, Gap and training loss."""
        with self._lock:
            return {"pushes": self._totals.pushes, **{f"run_{k}": v for k, v in self._totals.means().items()}}

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
        """Memory held by the workers' θ⁽ⁱ⁾ (policies with a Gap only): a θ⁽ⁱ⁾ that is still θ itself
        takes none, and one copy shared by several workers counts once."""
        return self._sent.held_bytes()

    def live_workers(self) -> list[WorkerRecord]:
        with self._lock:
            return list(self.members)

    def epoch(self) -> float:
        return self.samples / self.train_size if self.train_size else 0.0

    def held_snapshots(self) -> int:
        """Parameter snapshots θ⁽ⁱ⁾ held for workers (at most one per live worker)."""
        return self._sent.held()

    # -- crash safety -----------------------------------------------------------------------
    def checkpoint(self) -> Checkpoint:
        """A consistent copy of what a restarted server needs. Only the copy of θ and of the
        policy state happens under the lock; writing it to disk is the caller's, outside."""
        with self._lock:
            return Checkpoint(version=self.version, samples=self.samples, incarnation=self.incarnation,
                              config=self.config, theta=self.theta.clone(),
                              policy_state=self.policy.state_dict(), totals=dataclasses.asdict(self._totals))

    def restore(self, checkpoint: Checkpoint, incarnation: int) -> None:
        """Continues the run saved in ``checkpoint`` as server incarnation ``incarnation``.

        θ, the version, the examples seen, the run's totals and the policy state (momentum, GA's
        ``v``, ``k`` and ``η_max``) are restored. Per-worker policy state (DANA's buffers ``vⁱ``) is
        then dropped, exactly as when a worker leaves: the workers of the crashed server re-join
        under new ids, so a buffer of an old id would never be pushed to again, yet would stay in
        the look-ahead's ``Σⱼ vʲ`` forever. Snapshots are not saved: every worker pulls afresh.
        Raises ``ValueError`` when the checkpoint does not fit this run's model or policy.
        """
        if checkpoint.theta.shape != self.theta.shape:
            raise ValueError(f"the checkpoint holds {checkpoint.theta.numel()} parameters, the model of task "
                             f"{self.config.task!r} has {self.theta.numel()}")
        with self._lock:
            self.policy.load_state_dict(checkpoint.policy_state)
            for worker_id in self.policy.worker_ids():
                self.policy.forget_worker(worker_id)
            self._sent.detach()
            self.theta.copy_(checkpoint.theta)
            self.version = checkpoint.version
            self.samples = checkpoint.samples
            self._totals = Window(**checkpoint.totals)
            self.incarnation = incarnation
            self.members = Membership(first_id=first_worker_id(incarnation))
            self.finished = self.version >= self.total_updates
