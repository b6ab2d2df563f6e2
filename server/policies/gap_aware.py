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

then the common SGD step with ``d``. The pure functions below are what the server's policy and
the simulator share; :class:`GapStatistics` holds v, k and η_max for GA and DANA-GA. They are
also the reference for ``fused.py``, which runs the same arithmetic and the step after it in
one pass of C code where it can.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from . import fused
from .asgd import ASGD
from .base import take_tensor
from .sgd import weight_decayed


def update_second_moment_(v: Tensor, s: Tensor, *, beta: float) -> None:
    """``v ← β·v + (1−β)·s²``, in place."""
    v.mul_(beta).addcmul_(s, s, value=1 - beta)


def gap_scalars(*, k: int, lr_max: float, beta: float, eps: float) -> tuple[float, float] | None:
    """The two scalars of the Gap, ``(ε·√(1 − βᵏ), √(1 − βᵏ) / η_max)``; ``None`` when ``η_max = 0``.

    ``C = η_max·(sqrt(v / (1 − βᵏ)) + ε) = (η_max / √(1 − βᵏ))·(√v + ε·√(1 − βᵏ))``: the same C
    without forming v̂, so ``Gap = 1 + (√(1 − βᵏ) / η_max)·|θ − θ⁽ⁱ⁾| / (√v + ε·√(1 − βᵏ))``.
    """
    if k < 1:
        raise ValueError(f"Invalid update count k: {k} (v must have been updated at least once)")
    if lr_max == 0:
        return None
    root_bias = math.sqrt(1 - beta ** k)
    return eps * root_bias, root_bias / lr_max


def compute_gap(theta: Tensor, stale_theta: Tensor, v: Tensor, *, k: int, lr_max: float,
                beta: float = 0.999, eps: float = 1e-8, out: Tensor | None = None,
                scratch: Tensor | None = None) -> Tensor:
    """The per-element Gap ``1 + |θ − θ⁽ⁱ⁾| / C``, from ``v`` and ``k`` already updated.

    Written to ``out`` (a new tensor when None); ``scratch``, when given, is overwritten on the way.
    Where ``C = 0`` the Gap is 1. With ``ε > 0`` that happens exactly when ``η_max = 0`` (nothing
    has moved yet, e.g. a warm-up starting at learning rate 0), and then the Gap is 1 everywhere.
    """
    scalars = gap_scalars(k=k, lr_max=lr_max, beta=beta, eps=eps)
    if scalars is None:
        return torch.ones_like(theta) if out is None else out.fill_(1.0)
    eps_root_bias, gap_scale = scalars
    scaled_c = torch.sqrt(v, out=scratch).add_(eps_root_bias)
    gap = torch.sub(theta, stale_theta, out=out).abs_()
    return torch.addcdiv(theta.new_ones(()), gap, scaled_c, value=gap_scale, out=gap)


def gap_aware_direction(theta: Tensor, grad: Tensor, stale_theta: Tensor, v: Tensor, *, k: int,
                        lr_max: float, beta: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
                        out: Tensor | None = None, gap_out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """GA's direction ``d = (g + λ·θ) / Gap`` and the Gap, written to ``out`` and ``gap_out``
    (new tensors when None).

    Weight decay is penalised with the gradient (a choice of ALGORITHMS.md). ``v`` and ``k`` are
    the statistics after this update's :func:`update_second_moment_`.
    """
    gap = compute_gap(theta, stale_theta, v, k=k, lr_max=lr_max, beta=beta, eps=eps, out=gap_out, scratch=out)
    if weight_decay == 0:
        return torch.div(grad, gap, out=out), gap
    return weight_decayed(grad, theta, weight_decay, out=out).div_(gap), gap


class GapStatistics:
    """GA's running statistics: ``v``, the count ``k`` and ``η_max``, and the Gap they define.

    Args:
        numel: number of parameters.
        beta: decay of the running average of squared steps ``v`` (default 0.999).
        eps: ε in ``C`` (default 1e-8; must be > 0).
    """

    def __init__(self, numel: int, *, beta: float = 0.999, eps: float = 1e-8) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta value: {beta}")
        if not 0.0 < eps < math.inf:
            raise ValueError(f"Invalid epsilon value: {eps}")
        self.beta = float(beta)
        self.eps = float(eps)
        self.v = torch.zeros(numel)
        self.k = 0
        self.lr_max = 0.0

    def begin_update(self, lr: float) -> None:
        """Count this update and fold its learning rate into ``η_max``."""
        self.k += 1
        self.lr_max = max(self.lr_max, lr)

    def direction(self, part: slice, theta: Tensor, grad: Tensor, stale_theta: Tensor, s: Tensor, *,
                  weight_decay: float, scratch: tuple[Tensor, Tensor]) -> tuple[Tensor, float]:
        """For the slice ``part`` of the parameters: fold ``s`` into ``v``, then return GA's
        direction (in ``scratch[0]``) and the sum of the slice's Gaps."""
        v = self.v[part]
        update_second_moment_(v, s, beta=self.beta)
        direction, gap = gap_aware_direction(theta, grad, stale_theta, v, k=self.k, lr_max=self.lr_max,
                                             beta=self.beta, eps=self.eps, weight_decay=weight_decay,
                                             out=scratch[0], gap_out=scratch[1])
        return direction, gap.sum().item()

    def fused_update(self, theta: Tensor, grad: Tensor, stale_theta: Tensor | None, step: fused.Step, *,
                     weight_decay: float, lr: float, old_theta_into_grad: bool) -> float:
        """The whole push, :meth:`direction` on every slice then ``step``, in one pass of the fused
        kernel (:func:`.fused.gap_aware_update_`); returns the sum of the Gaps. A ``stale_theta`` of
        None is θ itself: every Gap is 1, as ``|θ − θ⁽ⁱ⁾| = 0`` makes it."""
        scalars = None if stale_theta is None else gap_scalars(k=self.k, lr_max=self.lr_max, beta=self.beta,
                                                               eps=self.eps)
        return fused.gap_aware_update_(theta, grad, stale_theta, self.v, step, scalars=scalars, beta=self.beta,
                                       weight_decay=weight_decay, lr=lr, old_theta_into_grad=old_theta_into_grad)

    def hyperparameters(self) -> dict[str, Any]:
        return {"beta": self.beta, "eps": self.eps}

    def state(self) -> dict[str, Tensor]:
        return {"ga.v": self.v,
                "ga.k": torch.tensor(self.k, dtype=torch.int64),
                "ga.lr_max": torch.tensor(self.lr_max, dtype=torch.float64)}

    def load_state(self, state: dict[str, Tensor]) -> None:
        """Pop the ``ga.*`` keys from ``state`` and install them."""
        self.v.copy_(take_tensor(state, "ga.v", self.v))
        self.k = int(take_tensor(state, "ga.k", torch.zeros((), dtype=torch.int64)))
        self.lr_max = float(take_tensor(state, "ga.lr_max", torch.zeros((), dtype=torch.float64)))


class GapPenalty:
    """Mixin that divides a policy's direction by the Gap: GA on ASGD, DANA-GA on DANA-Zero.

    It owns :class:`GapStatistics`, counts each update into them, and feeds ``s`` (the
    momentum buffer the base policy hands to ``_direction`` before this update, or ``g``
    without momentum) to their running average. Where the fused kernel applies
    (:func:`.fused.applicable`) the whole push runs in it, with the step :meth:`_fused_step`
    describes; otherwise the base policy's slice walk runs the torch operations.
    """

    needs_snapshot = True

    def __init__(self, numel: int, *, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, beta: float = 0.999, eps: float = 1e-8) -> None:
        super().__init__(numel, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
        self.statistics = GapStatistics(numel, beta=beta, eps=eps)
        fused.prepare()

    def hyperparameters(self) -> dict[str, Any]:
        return {**super().hyperparameters(), **self.statistics.hyperparameters()}

    def _apply(self, theta: Tensor, grad: Tensor, stale_theta: Tensor | None, *,
               lr: float, staleness: int, worker_id: int, old_theta_into_grad: bool) -> float:
        self.statistics.begin_update(lr)
        step = self._fused_step(worker_id)
        # θ⁽ⁱ⁾ may be θ itself: nothing changed since the worker was sent it (τ = 0, server/sent.py),
        # and every Gap is 1. The fused kernel then reads no θ⁽ⁱ⁾ (its pointers may not alias).
        measured = None if stale_theta is theta else stale_theta
        if fused.applicable(theta, grad, measured, self.statistics.v, step):
            return self.statistics.fused_update(theta, grad, measured, step, weight_decay=self.weight_decay,
                                                lr=lr, old_theta_into_grad=old_theta_into_grad) / self.numel
        return super()._apply(theta, grad, stale_theta, lr=lr, staleness=staleness, worker_id=worker_id,
                              old_theta_into_grad=old_theta_into_grad)

    def _fused_step(self, worker_id: int) -> fused.Step:
        """The step the base policy takes after the direction, for the fused kernel."""
        raise NotImplementedError

    def _direction(self, part: slice, theta: Tensor, grad: Tensor, stale_theta: Tensor | None,
                   buffer: Tensor | None, scratch: tuple[Tensor, Tensor]) -> tuple[Tensor, float]:
        s = grad if buffer is None else buffer
        return self.statistics.direction(part, theta, grad, stale_theta, s, weight_decay=self.weight_decay,
                                         scratch=scratch)

    def _state(self) -> dict[str, Tensor]:
        return {**super()._state(), **self.statistics.state()}

    def _load_state(self, state: dict[str, Tensor]) -> None:
        super()._load_state(state)
        self.statistics.load_state(state)


class GapAware(GapPenalty, ASGD):
    """GA: the master keeps one momentum buffer and GA's statistics; the server keeps θ⁽ⁱ⁾.

    Args: ``momentum``, ``nesterov``, ``weight_decay`` as in :class:`Policy`; ``beta`` and ``eps``
    as in :class:`GapStatistics`.
    """

    name = "gap-aware"

    def _fused_step(self, worker_id: int) -> fused.Step:
        return fused.Step(self.momentum, self.momentum_buffer, nesterov=self.nesterov)
