"""The common SGD step that every staleness policy ends with (ALGORITHMS.md, "The common SGD step").

PyTorch ``torch.optim.SGD`` semantics with dampening 0, written for one flat tensor and in place::

    buf ← μ·buf + d                                   (when μ > 0)
    step = d + μ·buf  if nesterov  else  buf          (when μ = 0: step = d)
    θ   ← θ − η·step

Weight decay enters ``d`` as ``λ·θ`` (coupled L2), see :func:`weight_decayed`. With parameter groups
(:mod:`.groups`) ``λ`` is a flat tensor of per-element ``λ_j`` and the step is multiplied element by
element by the learning-rate multipliers ``r`` (``θ ← θ − η·r⊙step``); a float ``λ`` and ``r = None``
are the plain step.

These functions are traced by ``torch.compile`` too, inside GA's push (:mod:`.fused`). Eagerly a
scaled sum is one torch call with a Python float ``alpha`` (one pass, no temporary, rounded as
``torch.optim.SGD`` rounds it); under ``torch.compile`` it is written with ``*`` instead, which
the compiler fuses into the same loop. A Python float given as ``alpha`` or ``value`` is compiled
in as a constant: with a guard, so every new learning rate compiles the code again, or (as
``addcmul``'s ``value`` did in torch 2.13) without one, so another value gets wrong results.
:func:`add_scaled_`, :func:`scale_add_` and :func:`add_scaled` are the three scaled sums, in both
forms; the functions branch only on what is fixed for a policy (a buffer or None, ``nesterov``,
``λ = 0``), never on a learning rate.
"""
from __future__ import annotations

import torch
from torch import Tensor


def add_scaled_(target: Tensor, tensor: Tensor, scale: float, weights: Tensor | None = None) -> Tensor:
    """``target ← target + scale·tensor``, or ``target + scale·weights⊙tensor`` with ``weights``, in place."""
    if weights is not None:
        if torch.compiler.is_compiling():
            return target.add_(tensor * weights * scale)
        return target.addcmul_(tensor, weights, value=scale)
    if torch.compiler.is_compiling():
        return target.add_(tensor * scale)
    return target.add_(tensor, alpha=scale)


def scale_add_(target: Tensor, scale: float, tensor: Tensor) -> Tensor:
    """``target ← scale·target + tensor``, in place."""
    if torch.compiler.is_compiling():
        return target.mul_(scale).add_(tensor)
    return torch.add(tensor, target, alpha=scale, out=target)


def add_scaled(tensor: Tensor, other: Tensor, scale: float) -> Tensor:
    """``tensor + scale·other``, a new tensor."""
    if torch.compiler.is_compiling():
        return tensor + other * scale
    return torch.add(tensor, other, alpha=scale)


def weight_decayed(grad: Tensor, theta: Tensor, weight_decay: float | Tensor) -> Tensor:
    """``g + λ·θ`` (``λ`` a float, or a flat tensor of per-element ``λ_j``): ``grad`` itself when
    ``λ`` is the float 0 (no copy), otherwise a new tensor."""
    if isinstance(weight_decay, Tensor):
        if torch.compiler.is_compiling():
            return grad + theta * weight_decay
        return torch.addcmul(grad, theta, weight_decay)
    if weight_decay == 0:
        return grad
    return add_scaled(grad, theta, weight_decay)


def sgd_step(theta: Tensor, direction: Tensor, momentum_buffer: Tensor | None, *,
             lr: float, momentum: float, nesterov: bool, lr_scale: Tensor | None = None) -> None:
    """Apply one SGD step with ``direction`` to ``theta``, updating ``momentum_buffer`` in place.

    ``momentum_buffer`` is ``None`` exactly when ``momentum == 0``. ``direction`` is only read.
    ``lr_scale``, the per-element learning-rate multipliers ``r``, multiplies the step (None: 1).
    """
    if momentum_buffer is None:
        add_scaled_(theta, direction, -lr, lr_scale)
        return
    scale_add_(momentum_buffer, momentum, direction)
    if nesterov:
        add_scaled_(add_scaled_(theta, direction, -lr, lr_scale), momentum_buffer, -lr * momentum, lr_scale)
    else:
        add_scaled_(theta, momentum_buffer, -lr, lr_scale)
