"""The parameter server's state: parameters, version, policy, membership and progress.

Everything here is plain Python and torch, free of gRPC, so it can be driven by the
servicer, the simulator and the tests alike. One lock makes every update atomic;
receiving a gradient (the slow part) happens outside it, in the servicer.
"""
from __future__ import annotations

import inspect
import math
import threading
import time
from dataclasses import dataclass

import torch

from gapaware.common.config import RunConfig, learning_rate
from gapaware.common.layout import ParamLayout
from gapaware.common.results import PushResult
from gapaware.server.errors import BadPush, LayoutMismatch, StaleSnapshot
from gapaware.server.membership import Membership, WorkerRecord
from gapaware.server.policies import POLICIES, Policy, make_policy


@dataclass
class Window:
    """Sums over the pushes applied since the last evaluation."""

    pushes: int = 0
    staleness: float = 0.0
    gap: float = 0.0
    loss: float = 0.0

    def add(self, staleness: int, gap: float, loss: float) -> None:
        self.pushes += 1
        self.staleness += staleness
        self.gap += gap
        self.loss += loss

    def means(self) -> dict[str, float]:
        n = max(1, self.pushes)
        return {"mean_staleness": self.staleness / n, "mean_gap": self.gap / n, "train_loss": self.loss / n}


def policy_for(config: RunConfig, numel: int) -> Policy:
    """The policy object ``config`` names, with the hyper-parameters that policy takes."""
    hyper = {"momentum": config.momentum, "nesterov": config.nesterov, "weight_decay": config.weight_decay}
    accepted = inspect.signature(POLICIES[config.policy]).parameters
    hyper.update({k: v for k, v in (("beta", config.ga_beta), ("eps", config.ga_eps)) if k in accepted})
    return make_policy(config.policy, numel, **hyper)


class ParameterServerState:
    def __init__(self, config: RunConfig, layout: ParamLayout, theta: torch.Tensor, train_size: int) -> None:
        if theta.dim() != 1 or theta.numel() != layout.numel or theta.dtype != torch.float32:
            raise ValueError(f"theta must be a flat float32 tensor of {layout.numel} elements")
        self.config = config
        self.layout = layout
        self.theta = theta
        self.policy = policy_for(config, layout.numel)
        self.train_size = train_size
        self.total_updates = config.total_updates(train_size)
        self.version = 0
        self.samples = 0
        self.finished = False
        self.members = Membership()
        self.started = time.monotonic()
        self._snapshots: dict[int, torch.Tensor] = {}
        self._snapshot_dtype = getattr(torch, config.snapshot_dtype)
        self._window = Window()
        self._totals = Window()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)

    # -- membership -------------------------------------------------------------------------
    def join(self, hostname: str, device: str, layout: ParamLayout | None) -> WorkerRecord:
        if layout is not None:
            mismatch = self.layout.describe_mismatch(layout)
            if mismatch:
                raise LayoutMismatch(f"the worker's model does not match the server's (task "
                                     f"{self.config.task!r}): {mismatch}")
        with self._lock:
            return self.members.add(hostname, device)

    def leave(self, worker_id: int) -> None:
        with self._lock:
            self.members.remove(worker_id)
            self._forget(worker_id)

    def _forget(self, worker_id: int) -> None:
        self._snapshots.pop(worker_id, None)
        self.policy.forget_worker(worker_id)

    def heartbeat(self, worker_id: int) -> bool:
        with self._lock:
            self.members.get(worker_id)
            return self.finished

    # -- the update path --------------------------------------------------------------------
    def lr(self) -> float:
        return learning_rate(self.config, self.version, self.total_updates)

    def pull(self, worker_id: int) -> tuple[int, torch.Tensor]:
        """What ``worker_id`` is sent: the version and a tensor nobody modifies afterwards.

        For policies that measure a Gap the same tensor is kept as the worker's θ⁽ⁱ⁾, or a
        bfloat16 copy of it with ``snapshot_dtype="bfloat16"`` (half the memory; the Gap is then
        measured against θ⁽ⁱ⁾ rounded to bfloat16, as ALGORITHMS.md allows).
        """
        with self._lock:
            record = self.members.get(worker_id)
            view = self.policy.pull_view(self.theta, lr=self.lr(), worker_id=worker_id)
            record.pulled_version = self.version
            if self.policy.needs_snapshot:
                self._snapshots[worker_id] = view.to(self._snapshot_dtype)
            return self.version, view

    def push(self, worker_id: int, grad: torch.Tensor, *, base_version: int, samples: int = 0,
             loss: float = math.nan) -> PushResult:
        """Applies ``grad``, computed by ``worker_id`` on ``base_version``, with the run's policy."""
        if grad.shape != self.theta.shape:
            raise BadPush(f"gradient has {grad.numel()} elements, the model has {self.theta.numel()}")
        with self._lock:
            record = self.members.get(worker_id)
            if base_version > self.version:
                raise BadPush(f"base version {base_version} is ahead of the server's version {self.version}")
            if record.pulled_version != base_version:
                sent = "nothing since its last push" if record.pulled_version is None else f"version {record.pulled_version}"
                raise StaleSnapshot(f"gradient computed on version {base_version} but worker {worker_id} was "
                                    f"last sent {sent}: pull, then push a gradient computed on what was pulled")
            if self.finished:
                return PushResult(self.version, self.version - base_version, 1.0, True, False)
            staleness = self.version - base_version
            gap = self.policy.apply(
                self.theta, grad, lr=self.lr(), staleness=staleness,
                stale_theta=self._snapshots.pop(worker_id, None), worker_id=worker_id,
            )
            record.pulled_version = None
            record.pushes += 1
            record.last_gap = gap
            self.version += 1
            self.samples += samples
            self._window.add(staleness, gap, loss)
            self._totals.add(staleness, gap, loss)
            if self.version >= self.total_updates:
                self.finished = True
            self._changed.notify_all()
            return PushResult(self.version, staleness, gap, self.finished, True)

    # -- observation ------------------------------------------------------------------------
    def parameters(self) -> tuple[int, torch.Tensor]:
        """A copy of the current parameters and their version, for evaluation."""
        with self._lock:
            return self.version, self.theta.clone()

    def take_window(self) -> dict[str, float]:
        """Means over the pushes since the previous call."""
        with self._lock:
            window, self._window = self._window, Window()
        return window.means()

    def totals(self) -> dict[str, float]:
        """The run so far: pushes applied and their mean staleness, Gap and training loss."""
        with self._lock:
            return {"pushes": self._totals.pushes, **{f"run_{k}": v for k, v in self._totals.means().items()}}

    def wait_for_version(self, version: int, timeout: float) -> int:
        """Blocks until the version reaches ``version``, the run finishes or ``timeout`` passes."""
        with self._lock:
            self._changed.wait_for(lambda: self.version >= version or self.finished, timeout)
            return self.version

    def finish(self) -> None:
        with self._lock:
            self.finished = True
            self._changed.notify_all()

    def snapshot_bytes(self) -> int:
        """Memory held by the workers' θ⁽ⁱ⁾ (policies with a Gap only)."""
        with self._lock:
            return sum(snapshot.nbytes for snapshot in self._snapshots.values())

    def live_workers(self) -> list[WorkerRecord]:
        with self._lock:
            return list(self.members)

    def epoch(self) -> float:
        return self.samples / self.train_size if self.train_size else 0.0
