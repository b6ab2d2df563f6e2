"""ASGD and NAG-ASGD: asynchronous SGD with no staleness mitigation.

The baselines of Barkai, Hakimi and Schuster, "Gap Aware Mitigation of Gradient Staleness",
ICLR 2020 (https://arxiv.org/abs/1909.10802). Every push is applied as it arrives, whatever
its staleness, with the common SGD step of ALGORITHMS.md on the direction::

    d = g + λ·θ

With momentum and ``nesterov=True`` this is NAG-ASGD. With parameter groups ``λ`` is per element
and the step is multiplied by the learning-rate multipliers ``r`` (:mod:`.groups`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import Policy, PolicySettings, take_tensor
from .groups import ElementRates
from .sgd import sgd_step, weight_decayed
from .slices import in_slices


def asgd_push_(theta: Tensor, grad: Tensor, momentum_buffer: Tensor | None, *, weight_decay: float | Tensor,
               lr: float, momentum: float, nesterov: bool, lr_scale: Tensor | None = None) -> None:
    """One ASGD push in place on ``theta`` and ``momentum_buffer`` (None when μ = 0)."""
    sgd_step(theta, weight_decayed(grad, theta, weight_decay), momentum_buffer, lr=lr, momentum=momentum,
             nesterov=nesterov, lr_scale=lr_scale)


class ASGD(Policy):
    """ASGD / NAG-ASGD with one master momentum buffer (zeros at start, allocated when μ > 0).

    Args: see :class:`~.base.Policy`.
    """

    name = "asgd"

    def __init__(self, numel: int, settings: PolicySettings = PolicySettings(), rates: ElementRates | None = None) -> None:
        super().__init__(numel, settings, rates)
        self.momentum_buffer = torch.zeros(numel) if self.momentum > 0 else None

    def apply(self, theta: Tensor, grad: Tensor, *, lr: float, staleness: int,
              stale_theta: Tensor | None = None, worker_id: int = 0) -> float:
        in_slices(asgd_push_, theta, grad, self.momentum_buffer, weight_decay=self.decay, lr=lr,
                  momentum=self.momentum, nesterov=self.nesterov, lr_scale=self.lr_scale)
        return 1.0

    def _state(self) -> dict[str, Tensor]:
        state = super()._state()
        if self.momentum_buffer is not None:
            state["momentum_buffer"] = self.momentum_buffer
        return state

    def _load_state(self, state: dict[str, Tensor]) -> None:
        super()._load_state(state)
        if self.momentum_buffer is not None:
            self.momentum_buffer.copy_(take_tensor(state, "momentum_buffer", self.momentum_buffer))
