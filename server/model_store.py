"""The model the server holds: θ, what each worker was last sent (θ⁽ⁱ⁾), and spare model-sized tensors.

A tensor handed out by :meth:`ModelStore.sent_copy` is never modified afterwards: it is sent, and
kept as the worker's θ⁽ⁱ⁾ when the policy measures a Gap (docs/ALGORITHMS.md#what-the-master-stores).
Model-sized float32 tensors that nobody reads any more (an applied gradient, a θ⁽ⁱ⁾ used by its
push, a sent copy once its last chunk is framed) are kept as spares for the next gradient or copy:
a fresh model-sized tensor costs the kernel a page fault and zeroing for every page, which on a
large model costs more than the copy itself.

A worker that pulls deltas (:meth:`ModelStore.delta_pull`, docs/ALGORITHMS.md#compressed-pushes-and-delta-pulls)
has a copy here of exactly what it rebuilt, whatever the policy: the base of its next delta, and
its θ⁽ⁱ⁾. The copy changes only at that worker's next pull, once the previous one was sent (each
chunk's bytes are copied as it is framed).
"""
from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass

import torch

from gapaware.common.codecs import Codec, Quantized, quantize_delta_
from gapaware.common.registry import DEFAULTS

SPARES = 2
"""Spare model-sized tensors kept at most: one push is applied while the next arrives."""


@dataclass(frozen=True)
class Outgoing:
    """What a pull sends: a tensor in a transport dtype, or a quantised delta to add to the parameters of
    the request's ``delta_base``. ``delta_id`` names what the worker holds after it (0: no copy kept
    here); ``reusable`` says whether the sender may :meth:`ModelStore.recycle` the tensor once sent."""

    tensor: torch.Tensor | Quantized
    reusable: bool
    delta: bool = False
    delta_id: int = 0


@dataclass
class WorkerCopy:
    """What a delta-pulling worker holds: ``tensor`` (float32), named ``delta_id``, ``deltas`` pulls
    after its last full one."""

    tensor: torch.Tensor
    delta_id: int
    deltas: int = 0


class ModelStore:
    """θ and the workers' θ⁽ⁱ⁾ in ``snapshot_dtype`` (float32, or bfloat16 for half the memory: the
    Gap is then measured against θ⁽ⁱ⁾ rounded to bfloat16). Not thread-safe except for the spares:
    the owner holds its lock around the rest. A delta-pulling worker gets a full float32 pull every
    ``full_pull_every`` pulls (and its copy is float32 whatever ``snapshot_dtype`` says)."""

    def __init__(self, theta: torch.Tensor, snapshot_dtype: torch.dtype = torch.float32,
                 full_pull_every: int = DEFAULTS.full_pull_every) -> None:
        if full_pull_every < 1:
            raise ValueError(f"Invalid full pull interval: {full_pull_every} (must be >= 1)")
        self.theta = theta
        self.snapshot_dtype = snapshot_dtype
        self.full_pull_every = full_pull_every
        self._snapshots: dict[int, torch.Tensor] = {}
        self._copies: dict[int, WorkerCopy] = {}
        self._copy_ids = itertools.count(1)
        self._spares: list[torch.Tensor] = []
        self._spares_lock = threading.Lock()
        # The model's buffers as they travel (gapaware.common.buffers), and their CRC-32C: those of the
        # latest applied push from any worker (docs/ALGORITHMS.md#buffers).
        self.buffers: tuple[bytes, int] = (b"", 0)

    def sent_copy(self, worker_id: int, parameters: torch.Tensor, dtype: torch.dtype, *,
                  keep_snapshot: bool) -> Outgoing:
        """What ``worker_id`` is sent: ``parameters`` (θ, or a tensor a policy computed from it, which
        is then this store's) in the transport ``dtype``; with ``keep_snapshot`` it is also kept as the
        worker's θ⁽ⁱ⁾, in the snapshot dtype, replacing the one it had (and any delta copy). Not
        reusable when it is the θ⁽ⁱ⁾, which its push recycles."""
        self._copies.pop(worker_id, None)
        own = parameters is not self.theta
        if dtype == torch.float32:
            sent = parameters if own else self._copy(parameters)
        else:
            sent = parameters.to(dtype)
        if keep_snapshot:
            if sent.dtype == self.snapshot_dtype:
                snapshot = sent
            elif self.snapshot_dtype == torch.float32:
                snapshot = parameters if own else self._copy(parameters)
            else:
                snapshot = parameters.to(self.snapshot_dtype)
            self._snapshots[worker_id] = snapshot
            return Outgoing(sent, snapshot is not sent)
        return Outgoing(sent, True)

    def delta_pull(self, worker_id: int, parameters: torch.Tensor, codec: Codec, base: int) -> Outgoing:
        """What ``worker_id`` is sent when it asks for a delta in ``codec``, holding the parameters named
        ``base``: ``Q(parameters − copy)``, the copy moved to what the worker rebuilds from it. A full
        float32 pull instead (the copy becomes ``parameters``) when ``base`` does not name this store's
        copy (at join, after a re-join, after a pull the worker did not receive whole) and every
        :attr:`full_pull_every` pulls. ``parameters`` as in :meth:`sent_copy`."""
        self._snapshots.pop(worker_id, None)
        own = parameters is not self.theta
        copy = self._copies.get(worker_id)
        if copy is None or base != copy.delta_id or copy.deltas + 1 >= self.full_pull_every:
            full = WorkerCopy(parameters if own else self._copy(parameters), next(self._copy_ids))
            self._copies[worker_id] = full
            return Outgoing(full.tensor, reusable=False, delta_id=full.delta_id)
        delta = quantize_delta_(parameters, copy.tensor, codec)
        if own:
            self.recycle(parameters)
        copy.delta_id, copy.deltas = next(self._copy_ids), copy.deltas + 1
        return Outgoing(delta, reusable=False, delta=True, delta_id=copy.delta_id)

    def take_snapshot(self, worker_id: int) -> tuple[torch.Tensor | None, bool]:
        """The worker's θ⁽ⁱ⁾ for its push, and whether the caller may :meth:`recycle` it once used: a
        snapshot is no longer held here (its push uses it up), a delta copy stays."""
        copy = self._copies.get(worker_id)
        if copy is not None:
            return copy.tensor, False
        return self._snapshots.pop(worker_id, None), True

    def forget(self, worker_id: int) -> None:
        self._snapshots.pop(worker_id, None)
        self._copies.pop(worker_id, None)

    def held(self) -> int:
        """θ⁽ⁱ⁾ and delta copies held for workers (at most one per live worker)."""
        return len(self._snapshots) + len(self._copies)

    def held_bytes(self) -> int:
        held = [*self._snapshots.values(), *(copy.tensor for copy in self._copies.values())]
        return sum(s.numel() * s.element_size() for s in held)

    def spare(self) -> torch.Tensor:
        """A float32 tensor of θ's size whose contents are garbage: a spare, or a new one."""
        with self._spares_lock:
            if self._spares:
                return self._spares.pop()
        return torch.empty_like(self.theta)

    def recycle(self, tensor: torch.Tensor | None) -> None:
        """``tensor`` (any tensor; only float32 ones of θ's size are kept) is read by nobody any more."""
        if tensor is None or tensor.dtype != torch.float32 or tensor.shape != self.theta.shape:
            return
        with self._spares_lock:
            if len(self._spares) < SPARES and all(tensor is not spare for spare in self._spares):
                self._spares.append(tensor)

    def _copy(self, parameters: torch.Tensor) -> torch.Tensor:
        return self.spare().copy_(parameters)
