"""DANA-Zero and DANA-GA: per-worker momentum with a look-ahead on pull.

Hakimi, Barkai, Gabel and Schuster, "Taming Momentum in a Distributed Asynchronous Environment",
2019 (https://arxiv.org/abs/1907.11612). The master keeps one momentum buffer ``vⁱ`` per worker.
On a push from worker ``i`` (ALGORITHMS.md, "DANA-Zero")::

    vⁱ ← μ·vⁱ + d                  d = g + λ·θ
    θ  ← θ − η·vⁱ

and a pull returns the look-ahead ``θ̂ = θ − η·μ·Σⱼ vʲ``, which the server records as θ⁽ⁱ⁾.
DANA-GA (Barkai, Hakimi and Schuster, ICLR 2020, https://arxiv.org/abs/1909.10802) divides
``d`` by the Gap measured against that ``θ̂`` before it enters ``vⁱ``.

Choices beyond ALGORITHMS.md:

* ``nesterov`` is accepted and ignored: the look-ahead already is DANA's Nesterov-style estimate.
* ``Σⱼ vʲ`` is a running sum updated on every push, so a pull costs O(numel) whatever the number
  of workers; it is reset to zeros when the last buffer is forgotten.
* DANA-GA feeds GA's running average with ``s = vⁱ`` as it is before this update when μ > 0,
  else ``g``: the per-worker counterpart of GA's master buffer.
* With μ = 0 no buffers are kept: every push is an ASGD step and ``θ̂ = θ``.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import fused
from .base import Policy, take_tensor
from .gap_aware import GapPenalty
from .sgd import weight_decayed


def dana_step(theta: Tensor, direction: Tensor, buffer: Tensor | None, buffer_sum: Tensor | None, *,
              lr: float, momentum: float) -> None:
    """``vⁱ ← μ·vⁱ + d``, ``θ ← θ − η·vⁱ`` and ``Σⱼ vʲ`` kept equal to the sum, all in place.

    ``buffer`` is the pushing worker's ``vⁱ``; both it and ``buffer_sum`` are ``None`` when μ = 0.
    """
    if momentum == 0:
        theta.add_(direction, alpha=-lr)
        return
    buffer_sum.sub_(buffer)
    torch.add(direction, buffer, alpha=momentum, out=buffer)
    buffer_sum.add_(buffer)
    theta.add_(buffer, alpha=-lr)


def dana_look_ahead(theta: Tensor, buffer_sum: Tensor, *, lr: float, momentum: float,
                    out: Tensor | None = None) -> Tensor:
    """``θ̂ = θ − η·μ·Σⱼ vʲ``, written to ``out`` (a new tensor when None)."""
    return torch.add(theta, buffer_sum, alpha=-lr * momentum, out=out)


class DanaZero(Policy):
    """DANA-Zero: one momentum buffer per worker, the look-ahead ``θ̂`` on every pull.

    Args: see :class:`Policy`; ``nesterov`` is ignored.
    """

    name = "dana"
    pulls_theta = False  # the look-ahead θ̂

    def __init__(self, numel: int, *, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0) -> None:
        super().__init__(numel, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
        self.buffers: dict[int, Tensor] = {}
        self.buffer_sum = torch.zeros(numel) if self.momentum > 0 else None

    def _apply(self, theta: Tensor, grad: Tensor, stale_theta: Tensor | None, *,
               lr: float, staleness: int, worker_id: int, old_theta_into_grad: bool) -> float:
        buffer = self._buffer(worker_id)
        gap_sum = 0.0
        for part, scratch in self._parts(theta):
            worker_part = None if buffer is None else buffer[part]
            sum_part = None if self.buffer_sum is None else self.buffer_sum[part]
            stale = None if stale_theta is None else stale_theta[part]
            direction, part_gap_sum = self._direction(part, theta[part], grad[part], stale, worker_part, scratch)
            step = functools.partial(dana_step, theta[part], direction, worker_part, sum_part, lr=lr,
                                     momentum=self.momentum)
            self._step_keeping(step, theta[part], grad[part] if old_theta_into_grad else None, scratch[1])
            gap_sum += part_gap_sum
        return gap_sum / self.numel

    def _direction(self, part: slice, theta: Tensor, grad: Tensor, stale_theta: Tensor | None,
                   buffer: Tensor | None, scratch: tuple[Tensor, Tensor]) -> tuple[Tensor, float]:
        """The direction ``d`` of one slice and the sum of the slice's Gaps (its length: no Gap here).

        ``buffer`` is the slice of the worker's ``vⁱ`` before this update; ``d`` may be written to
        the ``scratch`` tensors; the second is free again once this returns.
        """
        return weight_decayed(grad, theta, self.weight_decay, out=scratch[0]), float(theta.numel())

    def _pull_view(self, theta: Tensor, *, lr: float, worker_id: int, out: Tensor | None) -> Tensor:
        if self.buffer_sum is None:
            return super()._pull_view(theta, lr=lr, worker_id=worker_id, out=out)
        return dana_look_ahead(theta, self.buffer_sum, lr=lr, momentum=self.momentum, out=out)

    def forget_worker(self, worker_id: int) -> None:
        """Drop the worker's buffer and take it out of the running sum."""
        buffer = self.buffers.pop(worker_id, None)
        if buffer is None:
            return
        if self.buffers:
            self.buffer_sum.sub_(buffer)
        else:
            self.buffer_sum.zero_()  # exact once nobody is left: no rounding residue carries on

    def worker_ids(self) -> list[int]:
        return list(self.buffers)

    def _buffer(self, worker_id: int) -> Tensor | None:
        """The worker's ``vⁱ`` (zeros on its first push); ``None`` when μ = 0."""
        if self.buffer_sum is None:
            return None
        if worker_id not in self.buffers:
            self.buffers[worker_id] = torch.zeros(self.numel)
        return self.buffers[worker_id]

    def _state(self) -> dict[str, Tensor]:
        state = super()._state()
        if self.buffer_sum is not None:
            state["dana.v_sum"] = self.buffer_sum
            state.update({f"dana.v.{worker_id}": buffer for worker_id, buffer in self.buffers.items()})
        return state

    def _load_state(self, state: dict[str, Tensor]) -> None:
        super()._load_state(state)
        if self.buffer_sum is None:
            return
        self.buffer_sum.copy_(take_tensor(state, "dana.v_sum", self.buffer_sum))
        buffers = {}
        for key in [key for key in state if key.startswith("dana.v.")]:
            try:
                worker_id = int(key.removeprefix("dana.v."))
            except ValueError:
                raise ValueError(f"Invalid DANA buffer key in policy state: {key!r}") from None
            buffers[worker_id] = take_tensor(state, key, self.buffer_sum).clone()
        self.buffers = buffers


class DanaGapAware(GapPenalty, DanaZero):
    """DANA-GA: DANA-Zero whose direction is divided by the Gap against the look-ahead ``θ̂``.

    Args: ``momentum``, ``nesterov`` (ignored), ``weight_decay`` as in :class:`Policy`;
    ``beta`` and ``eps`` as in :class:`~.gap_aware.GapStatistics`.
    """

    name = "dana-ga"

    def _fused_step(self, worker_id: int) -> fused.Step:
        return fused.Step(self.momentum, self._buffer(worker_id), self.buffer_sum)
