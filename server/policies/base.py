"""The interface every staleness policy implements: settings checked once, then arithmetic only.

A policy turns one push (a worker's gradient, its staleness and, where needed, the parameters
the worker computed it on) into an in-place update of the master's flat float32 parameters
``theta`` (Barkai, Hakimi and Schuster, "Gap Aware Mitigation of Gradient Staleness", ICLR 2020,
https://arxiv.org/abs/1909.10802; the update rules are those of ALGORITHMS.md). As
``torch.optim.SGD`` does, the settings are validated when the policy is made
(:class:`PolicySettings`); :meth:`Policy.apply` then trusts its arguments: the server checks
shapes, learning rate and staleness at its door, and a push that reaches a policy is applied.
"""
from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any, ClassVar

from torch import Tensor

from gapaware.common.registry import DEFAULTS

from .groups import ElementRates


@dataclasses.dataclass(frozen=True)
class PolicySettings:
    """The hyper-parameters of every policy, validated here once (ALGORITHMS.md, "Notation", "GA").

    Every policy takes the same settings; those without a Gap ignore ``ga_beta`` and ``ga_eps``.

    Args:
        momentum: μ, 0 disables (default 0).
        nesterov: Nesterov momentum (default False; needs μ > 0).
        weight_decay: λ, coupled L2 added to the gradient as ``λ·θ`` (default 0).
        ga_beta: β, decay of GA's running average of squared steps (default 0.999).
        ga_eps: ε in GA's ``C`` (default 1e-8; must be > 0).
    """

    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    ga_beta: float = DEFAULTS.ga_beta
    ga_eps: float = DEFAULTS.ga_eps

    def __post_init__(self) -> None:
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"Invalid momentum value: {self.momentum}")
        if self.nesterov and self.momentum <= 0:
            raise ValueError(f"Nesterov momentum requires a momentum > 0, got: {self.momentum}")
        if not 0.0 <= self.weight_decay < math.inf:
            raise ValueError(f"Invalid weight_decay value: {self.weight_decay}")
        if not 0.0 <= self.ga_beta < 1.0:
            raise ValueError(f"Invalid GA beta value: {self.ga_beta}")
        if not 0.0 < self.ga_eps < math.inf:
            raise ValueError(f"Invalid GA epsilon value: {self.ga_eps}")


def take_tensor(state: dict[str, Tensor], key: str, like: Tensor) -> Tensor:
    """Pop ``state[key]``, checking it has the shape and dtype of ``like``."""
    if key not in state:
        raise ValueError(f"Missing key in policy state: {key!r}")
    value = state.pop(key)
    if value.shape != like.shape or value.dtype != like.dtype:
        raise ValueError(f"Policy state {key!r} has shape {tuple(value.shape)} and dtype {value.dtype}, "
                         f"expected {tuple(like.shape)} and {like.dtype}")
    return value


class Policy(abc.ABC):
    """One staleness policy: how the master applies a (possibly stale) gradient.

    Args:
        numel: number of parameters (length of the flat ``theta``).
        settings: the hyper-parameters, already validated.
        rates: the parameter groups' per-element weight decay and learning-rate multipliers
            (:mod:`.groups`); None: ``settings.weight_decay`` everywhere, multipliers 1.
    """

    name: ClassVar[str]
    """The CLI name (``--policy``)."""
    needs_snapshot: ClassVar[bool] = False
    """True when the server must keep θ⁽ⁱ⁾ per worker and pass it to :meth:`apply` as ``stale_theta``."""
    pulls_theta: ClassVar[bool] = True
    """True when a pull sends θ itself (:meth:`pull_view` copies it), which the server may then cast
    straight into a reduced transport dtype; False when it computes something else from θ."""

    def __init__(self, numel: int, settings: PolicySettings = PolicySettings(), rates: ElementRates | None = None) -> None:
        if not isinstance(numel, int) or numel < 1:
            raise ValueError(f"Invalid numel: {numel}")
        rates = rates or ElementRates(settings.weight_decay)
        for name, value in (("weight decay", rates.weight_decay), ("learning-rate multipliers", rates.lr_scale)):
            if isinstance(value, Tensor) and value.shape != (numel,):
                raise ValueError(f"Invalid per-element {name}: shape {tuple(value.shape)}, expected ({numel},)")
        self.numel = numel
        self.momentum = float(settings.momentum)
        self.nesterov = bool(settings.nesterov)
        self.weight_decay = float(settings.weight_decay)
        self.decay: float | Tensor = rates.weight_decay
        """λ as the arithmetic takes it: a float, or per element (:class:`~.groups.ElementRates`)."""
        self.lr_scale: Tensor | None = rates.lr_scale
        """The per-element learning-rate multipliers ``r``; None: 1 everywhere."""

    def hyperparameters(self) -> dict[str, Any]:
        """The settings this policy uses, as keywords of :func:`~gapaware.server.policies.make_policy`."""
        return {"momentum": self.momentum, "nesterov": self.nesterov, "weight_decay": self.weight_decay}

    @abc.abstractmethod
    def apply(self, theta: Tensor, grad: Tensor, *, lr: float, staleness: int,
              stale_theta: Tensor | None = None, worker_id: int = 0) -> float:
        """Apply one push from ``worker_id`` to ``theta`` in place; return the mean Gap of the update
        (1.0 for policies without a Gap).

        ``theta`` and ``grad`` are flat float32 tensors of :attr:`numel` elements; ``grad`` is only
        read. ``lr`` is η for this update (after schedule and warm-up, finite and ≥ 0), ``staleness``
        is τ ≥ 0, and ``stale_theta`` is θ⁽ⁱ⁾ (float32 or bfloat16, θ itself allowed), given
        exactly when :attr:`needs_snapshot`. Nothing of this is checked here: the caller does.
        """

    def pull_view(self, theta: Tensor, *, lr: float, worker_id: int) -> Tensor:
        """What ``worker_id`` is sent when it pulls, at learning rate ``lr``: a new tensor (here a
        copy of ``theta``)."""
        return theta.clone()

    def forget_worker(self, worker_id: int) -> None:
        """Drop the per-worker state of a worker that left (none here)."""

    def worker_ids(self) -> list[int]:
        """The workers this policy keeps per-worker state for (none here)."""
        return []

    def state_dict(self) -> dict[str, Tensor]:
        """A copy of all policy state, as tensors (scalars as 0-d tensors) that safetensors can save."""
        return {key: value.clone() for key, value in self._state().items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what :meth:`state_dict` returned; refuses missing, unexpected or mis-shaped entries
        with a ``ValueError`` (the policy may then be partly loaded: build a new one to retry)."""
        remaining = dict(state)
        self._load_state(remaining)
        if remaining:
            raise ValueError(f"Unexpected keys in {self.name!r} policy state: {sorted(remaining)}")

    def _state(self) -> dict[str, Tensor]:
        """All state tensors by key (the live ones; :meth:`state_dict` copies them)."""
        return {}

    def _load_state(self, state: dict[str, Tensor]) -> None:
        """Pop this policy's keys from ``state`` and install them."""

