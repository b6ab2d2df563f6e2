"""DANA-Zero and DANA-GA: per-worker momentum with a look-ahead on pull.

Hakimi, Barkai, Gabel and Schuster, "Taming Momentum in a Distributed Asynchronous Environment",
2019 (https://arxiv.org/abs/1907.11612). The master keeps one momentum buffer ``vⁱ`` per worker.
On a push from worker ``i`` (ALGORITHMS.md, "DANA-Zero")::

    vⁱ ← μ·vⁱ + d                  d = g + λ·θ
    θ  ← θ − η·vⁱ

and a pull returns the look-ahead ``θ̂ = θ − η·μ·Σⱼ vʲ``, which the server records as θ⁽ⁱ⁾.
DANA-GA (Barkai, Hakimi and Schuster, ICLR 2020, https://arxiv.org/abs/1909.10802) divides
``d`` by the Gap measured against that ``θ̂`` before it enters ``vⁱ``, and feeds GA's statistic
``s`` with the step the previous update applied: the buffer that moved θ last, whichever worker
pushed it, zeros before the first update (ALGORITHMS.md, "DANA-GA").

Choices beyond ALGORITHMS.md:

* ``nesterov`` is accepted and ignored: the look-ahead already is DANA's Nesterov-style estimate.
* ``Σⱼ vʲ`` is a running sum updated on every push, so a pull costs O(numel) whatever the number
  of workers; it is reset to zeros when the last buffer is forgotten.
* The buffer that moved θ last stays DANA-GA's ``s`` after its worker leaves, until the next push.
* With parameter groups (:mod:`.groups`) ``λ`` is per element and ``η`` is multiplied by each
  element's learning-rate multiplier ``r`` in the step and in the look-ahead alike.
* With μ = 0 no buffers are kept: every push is an ASGD step, ``θ̂ = θ``, and DANA-GA is GA
  without momentum (``s = g``).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import fused
from .base import Policy, PolicySettings, take_tensor
from .groups import ElementRates
from .gap_aware import GapStatistics, gap_aware_direction_, gap_aware_push_
from .sgd import add_scaled, add_scaled_, scale_add_, weight_decayed
from .slices import in_slices

LAST_STEP = "dana.last_step"
"""DANA-GA's state key for ``s``, the step the previous update applied."""


def dana_step(theta: Tensor, direction: Tensor, buffer: Tensor | None, buffer_sum: Tensor | None, *,
              lr: float, momentum: float, lr_scale: Tensor | None = None) -> None:
    """``vⁱ ← μ·vⁱ + d``, ``θ ← θ − η·r⊙vⁱ`` and ``Σⱼ vʲ`` kept equal to the sum, all in place.

    ``buffer`` is the pushing worker's ``vⁱ``; both it and ``buffer_sum`` are ``None`` when μ = 0.
    ``lr_scale`` is ``r`` (None: 1).
    """
    if buffer is None:
        add_scaled_(theta, direction, -lr, lr_scale)
        return
    buffer_sum.sub_(buffer)
    scale_add_(buffer, momentum, direction)
    buffer_sum.add_(buffer)
    add_scaled_(theta, buffer, -lr, lr_scale)


def dana_push_(theta: Tensor, grad: Tensor, buffer: Tensor | None, buffer_sum: Tensor | None, *,
               weight_decay: float | Tensor, lr: float, momentum: float, lr_scale: Tensor | None = None) -> None:
    """One DANA-Zero push in place: :func:`dana_step` with ``d = g + λ·θ``."""
    dana_step(theta, weight_decayed(grad, theta, weight_decay), buffer, buffer_sum, lr=lr, momentum=momentum,
              lr_scale=lr_scale)


def dana_look_ahead(theta: Tensor, buffer_sum: Tensor, *, lr: float, momentum: float,
                    lr_scale: Tensor | None = None) -> Tensor:
    """``θ̂ = θ − η·μ·r⊙Σⱼ vʲ``, a new tensor."""
    if lr_scale is not None:
        return torch.addcmul(theta, buffer_sum, lr_scale, value=-lr * momentum)
    return add_scaled(theta, buffer_sum, -lr * momentum)


def dana_gap_aware_push_(theta: Tensor, grad: Tensor, stale_theta: Tensor, v: Tensor, last_step: Tensor,
                         buffer: Tensor, buffer_sum: Tensor, *, beta: float, eps_root_bias: float, gap_scale: float,
                         weight_decay: float | Tensor, lr: float, momentum: float,
                         lr_scale: Tensor | None = None) -> Tensor:
    """One DANA-GA push (μ > 0) in place on ``theta``, ``v``, the pushing worker's ``buffer`` and
    ``buffer_sum``; ``last_step`` (``s``, read first: it may be ``buffer`` itself) is the buffer
    that moved θ last. Returns the sum of the Gaps (a 0-d float64 tensor)."""
    direction, gap = gap_aware_direction_(theta, grad, stale_theta, v, last_step, beta=beta,
                                          eps_root_bias=eps_root_bias, gap_scale=gap_scale, weight_decay=weight_decay,
                                          lr_scale=lr_scale)
    dana_step(theta, direction, buffer, buffer_sum, lr=lr, momentum=momentum, lr_scale=lr_scale)
    return gap.sum(dtype=torch.float64)


class DanaZero(Policy):
    """DANA-Zero: one momentum buffer per worker, the look-ahead ``θ̂`` on every pull.

    Args: see :class:`~.base.Policy`; ``nesterov`` is ignored.
    """

    name = "dana"
    pulls_theta = False  # the look-ahead θ̂

    def __init__(self, numel: int, settings: PolicySettings = PolicySettings(), rates: ElementRates | None = None) -> None:
        super().__init__(numel, settings, rates)
        self.buffers: dict[int, Tensor] = {}
        self.buffer_sum = torch.zeros(numel) if self.momentum > 0 else None

    def apply(self, theta: Tensor, grad: Tensor, *, lr: float, staleness: int,
              stale_theta: Tensor | None = None, worker_id: int = 0) -> float:
        in_slices(dana_push_, theta, grad, self._buffer(worker_id), self.buffer_sum, weight_decay=self.decay,
                  lr=lr, momentum=self.momentum, lr_scale=self.lr_scale)
        return 1.0

    def pull_view(self, theta: Tensor, *, lr: float, worker_id: int) -> Tensor:
        if self.buffer_sum is None:
            return super().pull_view(theta, lr=lr, worker_id=worker_id)
        return dana_look_ahead(theta, self.buffer_sum, lr=lr, momentum=self.momentum, lr_scale=self.lr_scale)

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


class DanaGapAware(DanaZero):
    """DANA-GA: DANA-Zero whose direction is divided by the Gap against the look-ahead ``θ̂``.

    Args: see :class:`~.base.Policy` (``nesterov`` ignored); DANA-GA uses ``ga_beta`` and
    ``ga_eps`` of the settings too.
    """

    name = "dana-ga"
    needs_snapshot = True

    def __init__(self, numel: int, settings: PolicySettings = PolicySettings(), rates: ElementRates | None = None) -> None:
        super().__init__(numel, settings, rates)
        self.statistics = GapStatistics(numel, beta=settings.ga_beta, eps=settings.ga_eps)
        self.last_step = torch.zeros(numel) if self.momentum > 0 else None
        """``s``: the buffer that moved θ last (zeros before the first update); None when μ = 0."""

    def hyperparameters(self) -> dict[str, Any]:
        return {**super().hyperparameters(), **self.statistics.hyperparameters()}

    def apply(self, theta: Tensor, grad: Tensor, *, lr: float, staleness: int,
              stale_theta: Tensor | None = None, worker_id: int = 0) -> float:
        scalars = {**self.statistics.begin_update(lr), "weight_decay": self.decay, "lr": lr,
                   "lr_scale": self.lr_scale}
        if self.last_step is None:
            gap_sum = fused.run(gap_aware_push_, theta, grad, stale_theta, self.statistics.v, None, **scalars,
                                momentum=0.0, nesterov=False)
        else:
            buffer = self._buffer(worker_id)
            gap_sum = fused.run(dana_gap_aware_push_, theta, grad, stale_theta, self.statistics.v, self.last_step,
                                buffer, self.buffer_sum, **scalars, momentum=self.momentum)
            self.last_step = buffer
        return gap_sum / self.numel

    def _state(self) -> dict[str, Tensor]:
        state = {**super()._state(), **self.statistics.state()}
        if self.last_step is not None:
            state[LAST_STEP] = self.last_step
        return state

    def _load_state(self, state: dict[str, Tensor]) -> None:
        if self.last_step is not None and LAST_STEP not in state and {"ga.v", "dana.v_sum"} <= state.keys():
            raise ValueError(f"Missing key in policy state: {LAST_STEP!r}. The state was saved by an older "
                             "gapaware whose DANA-GA fed GA's statistics with the pushing worker's own buffer "
                             "(withdrawn from ALGORITHMS.md); it cannot continue with the current rule: start "
                             "the run afresh")
        super()._load_state(state)
        self.statistics.load_state(state)
        if self.last_step is not None:
            self.last_step = take_tensor(state, LAST_STEP, self.last_step).clone()
