"""ASGD and NAG-ASGD: asynchronous SGD with no staleness mitigation.

The baselines of Barkai, Hakimi and Schuster, "Gap Aware Mitigation of Gradient Staleness",
ICLR 2020 (https://arxiv.org/abs/1909.10802). Every push is applied as it arrives, whatever
its staleness, with the common SGD step of ALGORITHMS.md on the direction::

    d = g + λ·θ

With momentum and ``nesterov=True`` this is NAG-ASGD.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from .base import Policy, take_tensor
from .sgd import sgd_step, weight_decayed


class ASGD(Policy):
    """ASGD / NAG-ASGD with one master momentum buffer (zeros at start, allocated when μ > 0).

    Args: see :class:`Policy` (``momentum``, ``nesterov``, ``weight_decay``).
    """

    name = "asgd"

    def __init__(self, numel: int, *, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0) -> None:
        super().__init__(numel, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
        self.momentum_buffer = torch.zeros(numel) if self.momentum > 0 else None

    def _apply(self, theta: Tensor, grad: Tensor, stale_theta: Tensor | None, *,
               lr: float, staleness: int, worker_id: int, old_theta_into_grad: bool) -> float:
        gap_sum = 0.0
        for part, scratch in self._parts(theta):
            buffer = None if self.momentum_buffer is None else self.momentum_buffer[part]
            stale = None if stale_theta is None else stale_theta[part]
            direction, part_gap_sum = self._direction(part, theta[part], grad[part], stale, buffer, scratch)
            step = functools.partial(sgd_step, theta[part], direction, buffer, lr=lr, momentum=self.momentum,
                                     nesterov=self.nesterov)
            self._step_keeping(step, theta[part], grad[part] if old_theta_into_grad else None, scratch[1])
            gap_sum += part_gap_sum
        return gap_sum / self.numel

    def _direction(self, part: slice, theta: Tensor, grad: Tensor, stale_theta: Tensor | None,
                   momentum_buffer: Tensor | None, scratch: tuple[Tensor, Tensor]) -> tuple[Tensor, float]:
        """The direction ``d`` of one slice and the sum of the slice's Gaps (its length: no Gap here).

        ``momentum_buffer`` is the slice's buffer as it is before this update; ``d`` may be written
        to the ``scratch`` tensors; the second is free again once this returns.
        """
        return weight_decayed(grad, theta, self.weight_decay, out=scratch[0]), float(theta.numel())

    def _state(self) -> dict[str, Tensor]:
        state = super()._state()
        if self.momentum_buffer is not None:
            state["momentum_buffer"] = self.momentum_buffer
        return state

    def _load_state(self, state: dict[str, Tensor]) -> None:
        super()._load_state(state)
        if self.momentum_buffer is not None:
            self.momentum_buffer.copy_(take_tensor(state, "momentum_buffer", self.momentum_buffer))
