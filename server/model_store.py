"""The model the server holds: θ, what each worker was last sent (θ⁽ⁱ⁾), and spare model-sized tensors.

A tensor handed out by :meth:`ModelStore.sent_copy` is never modified afterwards: it is sent, and
kept as the worker's θ⁽ⁱ⁾ when the policy measures a Gap (docs/ALGORITHMS.md#what-the-master-stores).
Model-sized float32 tensors that nobody reads any more (an applied gradient, a θ⁽ⁱ⁾ used by its
push, a sent copy once its last chunk is framed) are kept as spares for the next gradient or copy:
a fresh model-sized tensor costs the kernel a page fault and zeroing for every page, which on a
large model costs more than the copy itself.
"""
from __future__ import annotations

import threading

import torch

SPARES = 2
"""Spare model-sized tensors kept at most: one push is applied while the next arrives."""


class ModelStore:
    """θ and the workers' θ⁽ⁱ⁾ in ``snapshot_dtype`` (float32, or bfloat16 for half the memory: the
    Gap is then measured against θ⁽ⁱ⁾ rounded to bfloat16). Not thread-safe except for the spares:
    the owner holds its lock around the rest."""

    def __init__(self, theta: torch.Tensor, snapshot_dtype: torch.dtype = torch.float32) -> None:
        self.theta = theta
        self.snapshot_dtype = snapshot_dtype
        self._snapshots: dict[int, torch.Tensor] = {}
        self._spares: list[torch.Tensor] = []
        self._spares_lock = threading.Lock()
        # The model's buffers as they travel (gapaware.common.buffers), and their CRC-32C: those of the
        # latest applied push from any worker (docs/ALGORITHMS.md#buffers).
        self.buffers: tuple[bytes, int] = (b"", 0)

    def sent_copy(self, worker_id: int, parameters: torch.Tensor, dtype: torch.dtype, *,
                  keep_snapshot: bool) -> tuple[torch.Tensor, bool]:
        """What ``worker_id`` is sent: ``parameters`` (θ, or a tensor a policy computed from it, which
        is then this store's) in the transport ``dtype``; with ``keep_snapshot`` it is also kept as the
        worker's θ⁽ⁱ⁾, in the snapshot dtype, replacing the one it had. The flag says whether the sender
        may :meth:`recycle` the tensor once sent: False when it is the θ⁽ⁱ⁾, which its push recycles."""
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
            return sent, snapshot is not sent
        return sent, True

    def take_snapshot(self, worker_id: int) -> torch.Tensor | None:
        """The worker's θ⁽ⁱ⁾, no longer held here (its push uses it up)."""
        return self._snapshots.pop(worker_id, None)

    def forget(self, worker_id: int) -> None:
        self._snapshots.pop(worker_id, None)

    def held(self) -> int:
        """θ⁽ⁱ⁾ held for workers (at most one per live worker)."""
        return len(self._snapshots)

    def held_bytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self._snapshots.values())

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
