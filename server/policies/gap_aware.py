"""GA, gap-aware ASGD: divide each stale gradient, element by element, by its Gap.

Barkai, Hakimi and Schuster, "Gap Aware Mitigation of Gradient Staleness", ICLR 2020
(https://arxiv.org/abs/1909.10802). On each push, per element (ALGORITHMS.md, "GA")::

    s   = buf if μ > 0 else g            (buf as it is before this update)
    v   ← β·v + (1−β)·s²                  (v: zeros at start)
    k   ← k + 1
    v̂   = v / (1 − βᵏ)
    C   = η_max·(sqrt(v̂) + ε)            (η_max: the largest η so far, this one included)
    Gap = 1 + |θ − θ⁽ⁱ⁾| / C              (1 where C = 0)
    d   = (g + λ·θ) / Gap

then the common SGD step with ``d``. With parameter groups (:mod:`.groups`) ``λ`` is per element
and each element's ``C`` is multiplied by its learning-rate multiplier ``r`` (``C = r·η_max·(√v̂ + ε)``,
the size of that element's typical step), as is its step. :func:`gap_aware_push_` is that whole push as a plain torch
function over flat tensors, the reference that :mod:`.fused` runs or compiles; its pieces are
shared with DANA-GA (:mod:`.dana`). :class:`GapStatistics` holds ``v``, ``k`` and ``η_max``.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from . import fused
from .asgd import ASGD
from .base import PolicySettings, take_tensor
from .groups import ElementRates
from .sgd import add_scaled_, sgd_step, weight_decayed


def gap_scalars(*, k: int, lr_max: float, beta: float, eps: float) -> tuple[float, float]:
    """The two scalars of the Gap, ``(ε·√(1 − βᵏ), √(1 − βᵏ) / η_max)``, for ``k ≥ 1``.

    ``C = η_max·(sqrt(v / (1 − βᵏ)) + ε) = (η_max / √(1 − βᵏ))·(√v + ε·√(1 − βᵏ))``: the same C
    without forming v̂, so ``Gap = 1 + (√(1 − βᵏ) / η_max)·|θ − θ⁽ⁱ⁾| / (√v + ε·√(1 − βᵏ))``.
    Where ``η_max = 0`` (nothing has moved yet, e.g. a warm-up starting at learning rate 0) C is
    0 and the Gap is 1: the second scalar is then 0, which makes every Gap exactly 1 (with
    ``ε > 0`` the denominator is never 0).
    """
    root_bias = math.sqrt(1 - beta ** k)
    return eps * root_bias, (root_bias / lr_max if lr_max > 0 else 0.0)


def gap_aware_direction_(theta: Tensor, grad: Tensor, stale_theta: Tensor, v: Tensor, s: Tensor, *,
                         beta: float, eps_root_bias: float, gap_scale: float,
                         weight_decay: float | Tensor, lr_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Fold ``s`` into ``v`` (``v ← β·v + (1−β)·s²``, in place), then return GA's direction
    ``d = (g + λ·θ) / Gap`` and the Gap, both new tensors.

    ``eps_root_bias`` and ``gap_scale`` are :func:`gap_scalars` of this update. Weight decay is
    penalised with the gradient (a choice of ALGORITHMS.md). ``lr_scale`` (``r``) divides the gap
    term: ``Gap = 1 + |θ − θ⁽ⁱ⁾| / (r·C)``.
    """
    add_scaled_(v.mul_(beta), s * s, 1 - beta)
    distance = (theta - stale_theta).abs_().div_(v.sqrt().add_(eps_root_bias))
    if lr_scale is not None:
        distance.div_(lr_scale)
    gap = distance.mul_(gap_scale).add_(1)
    return weight_decayed(grad, theta, weight_decay).div(gap), gap


def gap_aware_push_(theta: Tensor, grad: Tensor, stale_theta: Tensor, v: Tensor, momentum_buffer: Tensor | None,
                    *, beta: float, eps_root_bias: float, gap_scale: float, weight_decay: float | Tensor, lr: float,
                    momentum: float, nesterov: bool, lr_scale: Tensor | None = None) -> Tensor:
    """One GA push in place on ``theta``, ``v`` and ``momentum_buffer`` (None when μ = 0); returns
    the sum of the Gaps (a 0-d float64 tensor). ``s`` is the buffer before this update, else ``g``."""
    s = grad if momentum_buffer is None else momentum_buffer
    direction, gap = gap_aware_direction_(theta, grad, stale_theta, v, s, beta=beta, eps_root_bias=eps_root_bias,
                                          gap_scale=gap_scale, weight_decay=weight_decay, lr_scale=lr_scale)
    sgd_step(theta, direction, momentum_buffer, lr=lr, momentum=momentum, nesterov=nesterov, lr_scale=lr_scale)
    return gap.sum(dtype=torch.float64)


class GapStatistics:
    """GA's running statistics: ``v``, the count ``k`` and ``η_max``.

    Args:
        numel: number of parameters.
        beta: β, decay of the running average of squared steps ``v``.
        eps: ε in ``C``.
    """

    def __init__(self, numel: int, *, beta: float, eps: float) -> None:
        self.beta = float(beta)
        self.eps = float(eps)
        self.v = torch.zeros(numel)
        self.k = 0
        self.lr_max = 0.0

    def begin_update(self, lr: float) -> dict[str, float]:
        """Count this update and fold its learning rate into ``η_max``; the scalar keywords of
        :func:`gap_aware_direction_` for it."""
        self.k += 1
        self.lr_max = max(self.lr_max, lr)
        eps_root_bias, gap_scale = gap_scalars(k=self.k, lr_max=self.lr_max, beta=self.beta, eps=self.eps)
        return {"beta": self.beta, "eps_root_bias": eps_root_bias, "gap_scale": gap_scale}

    def hyperparameters(self) -> dict[str, Any]:
        return {"ga_beta": self.beta, "ga_eps": self.eps}

    def state(self) -> dict[str, Tensor]:
        return {"ga.v": self.v,
                "ga.k": torch.tensor(self.k, dtype=torch.int64),
                "ga.lr_max": torch.tensor(self.lr_max, dtype=torch.float64)}

    def load_state(self, state: dict[str, Tensor]) -> None:
        """Pop the ``ga.*`` keys from ``state`` and install them."""
        self.v.copy_(take_tensor(state, "ga.v", self.v))
        self.k = int(take_tensor(state, "ga.k", torch.zeros((), dtype=torch.int64)))
        self.lr_max = float(take_tensor(state, "ga.lr_max", torch.zeros((), dtype=torch.float64)))


class GapAware(ASGD):
    """GA: the master keeps one momentum buffer and GA's statistics; the server keeps θ⁽ⁱ⁾.

    Args: see :class:`~.base.Policy`; GA uses ``ga_beta`` and ``ga_eps`` of the settings too.
    """

    name = "gap-aware"
    needs_snapshot = True

    def __init__(self, numel: int, settings: PolicySettings = PolicySettings(), rates: ElementRates | None = None) -> None:
        super().__init__(numel, settings, rates)
        self.statistics = GapStatistics(numel, beta=settings.ga_beta, eps=settings.ga_eps)

    def hyperparameters(self) -> dict[str, Any]:
        return {**super().hyperparameters(), **self.statistics.hyperparameters()}

    def apply(self, theta: Tensor, grad: Tensor, *, lr: float, staleness: int,
              stale_theta: Tensor | None = None, worker_id: int = 0) -> float:
        scalars = self.statistics.begin_update(lr)
        gap_sum = fused.run(gap_aware_push_, theta, grad, stale_theta, self.statistics.v, self.momentum_buffer,
                            **scalars, weight_decay=self.decay, lr=lr, momentum=self.momentum,
                            nesterov=self.nesterov, lr_scale=self.lr_scale)
        return gap_sum / self.numel

    def _state(self) -> dict[str, Tensor]:
        return {**super()._state(), **self.statistics.state()}

    def _load_state(self, state: dict[str, Tensor]) -> None:
        super()._load_state(state)
        self.statistics.load_state(state)
