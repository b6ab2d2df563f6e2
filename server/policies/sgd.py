"""The common SGD step that every staleness policy ends with (ALGORITHMS.md, "The common SGD step").

PyTorch ``torch.optim.SGD`` semantics with dampening 0, written for one flat tensor and in place::

    buf ← μ·buf + d                                   (when μ > 0)
    step = d + μ·buf  if nesterov  else  buf          (when μ = 0: step = d)
    θ   ← θ − η·step

Weight decay enters ``d`` as ``λ·θ`` (coupled L2), see :func:`weight_decayed`.
"""
from __future__ import annotations

import torch
from torch import Tensor


def weight_decayed(grad: Tensor, theta: Tensor, weight_decay: float, *, out: Tensor | None = None) -> Tensor:
    """``g + λ·θ``: ``grad`` itself when ``λ = 0`` (no copy), otherwise ``out`` or a new tensor."""
    if weight_decay == 0:
        return grad
    return torch.add(grad, theta, alpha=weight_decay, out=out)


def sgd_step(theta: Tensor, direction: Tensor, momentum_buffer: Tensor | None, *,
             lr: float, momentum: float, nesterov: bool) -> None:
    """Apply one SGD step with ``direction`` to ``theta``, updating ``momentum_buffer`` in place.

    ``momentum_buffer`` may be ``None`` when ``momentum == 0``. ``direction`` is only read.
    """
    if momentum == 0:
        theta.add_(direction, alpha=-lr)
        return
    torch.add(direction, momentum_buffer, alpha=momentum, out=momentum_buffer)  # μ·buf + d in one pass
    if nesterov:
        theta.add_(direction, alpha=-lr).add_(momentum_buffer, alpha=-lr * momentum)
    else:
        theta.add_(momentum_buffer, alpha=-lr)
