"""Turns admitted pushes into updates of θ: the policy, the learning-rate schedule, what a NaN or Inf
gradient or result gets, the bound on a push, and the statistics of the pushes applied. Not
thread-safe: the owner holds its lock."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from gapaware.common.registry import NONFINITE_ACTIONS
from gapaware.common.config import RunConfig, learning_rate
from gapaware.common.transport import all_finite
from gapaware.server.errors import NonFiniteGradient, NonFiniteUpdate, OversizedGradient
from gapaware.common.layout import ParamLayout
from gapaware.server.policies import ElementRates, Policy, element_rates, make_policy
from gapaware.server.push import AdmittedPush
from gapaware.server.push_bound import NormBound, gradient_norm


@dataclass
class Window:
    """Sums over a run of applied pushes."""

    pushes: int = 0
    staleness: float = 0.0
    gap: float = 0.0
    loss: float = 0.0
    losses: int = 0          # pushes that reported a finite loss (NaN: none reported)
    staleness_counts: list[int] = field(default_factory=list)  # [i]: pushes of staleness i

    def add(self, staleness: int, gap: float, loss: float) -> None:
        self.pushes += 1
        self.staleness += staleness
        self.gap += gap
        if math.isfinite(loss):
            self.loss += loss
            self.losses += 1
        if staleness >= len(self.staleness_counts):
            self.staleness_counts.extend([0] * (staleness + 1 - len(self.staleness_counts)))
        self.staleness_counts[staleness] += 1

    def means(self) -> dict[str, float]:
        n = max(1, self.pushes)
        train_loss = self.loss / self.losses if self.losses else math.nan
        return {"mean_staleness": self.staleness / n, "mean_gap": self.gap / n, "train_loss": train_loss}


def policy_for(config: RunConfig, layout: ParamLayout, rates: ElementRates | None = None) -> Policy:
    """The policy ``config`` names for ``layout``, with the run's hyper-parameters and parameter groups:
    ``rates``, or those of ``layout`` (raises ``ValueError`` for a group pattern that matches no
    trainable parameter)."""
    return make_policy(config.policy, layout.numel, momentum=config.momentum, nesterov=config.nesterov,
                       weight_decay=config.weight_decay, ga_beta=config.ga_beta, ga_eps=config.ga_eps,
                       rates=element_rates(layout, config) if rates is None else rates)


class Updater:
    """Applies pushes with the run's policy at the scheduled learning rate, counting them.

    ``version`` is the number of updates applied; ``window`` sums the pushes since the last
    evaluation took it, ``totals`` those of the whole run. A gradient with NaN or Inf elements is
    refused (``nonfinite="reject"``), acknowledged and dropped (``"skip"``) or applied as it is
    (``"apply"``, for the simulator to show divergence), and counted in ``nonfinite_pushes``. Under
    ``"reject"`` and ``"skip"`` an update whose θ comes out with NaN or Inf is undone the same way
    (θ as it was; counted in ``nonfinite_updates``). With ``grad_norm_bound`` k > 0 a gradient far
    larger than the recent accepted ones is refused (:mod:`gapaware.server.push_bound`; counted in
    ``oversized_pushes``).
    """

    def __init__(self, config: RunConfig, layout: ParamLayout, total_updates: int, nonfinite: str = "reject",
                 grad_norm_bound: float = 0.0, rates: ElementRates | None = None) -> None:
        if nonfinite not in NONFINITE_ACTIONS:
            raise ValueError(f"Invalid non-finite action: {nonfinite!r} (choose from {', '.join(NONFINITE_ACTIONS)})")
        self.config = config
        self.policy = policy_for(config, layout, rates)
        self.total_updates = total_updates
        self.nonfinite = nonfinite
        self.nonfinite_pushes = 0
        self.nonfinite_updates = 0
        self.bound = NormBound(grad_norm_bound) if grad_norm_bound else None
        self.oversized_pushes = 0
        self.version = 0
        self.samples = 0
        self.window = Window()
        self.totals = Window()

    def lr(self) -> float:
        return learning_rate(self.config, self.version, self.total_updates)

    def measure(self, push: AdmittedPush) -> float:
        """What the bound compares, computed without the lock (it reads only the push): the
        gradient's norm; NaN without a bound or for a gradient with NaN or Inf."""
        return gradient_norm(push.grad) if self.bound is not None and push.finite else math.nan

    def drops(self, push: AdmittedPush, norm: float = math.nan) -> bool:
        """Whether ``push`` (of gradient norm ``norm``, from :meth:`measure`) is dropped for holding
        NaN or Inf; raises when such a push is refused, or one whose norm exceeds the bound."""
        if push.finite:
            if self.bound is not None:
                try:
                    self.bound.check(norm)
                except OversizedGradient:
                    self.oversized_pushes += 1
                    raise
            return False
        self.nonfinite_pushes += 1
        if self.nonfinite == "reject":
            bad = int((~torch.isfinite(push.grad)).sum())
            raise NonFiniteGradient(
                f"gradient has {bad} NaN or Inf elements (of {push.grad.numel()}): nothing was applied; "
                "lower the learning rate or clip gradients, or start the server with --nonfinite skip")
        return self.nonfinite == "skip"

    def apply(self, theta: torch.Tensor, push: AdmittedPush, stale_theta: torch.Tensor | None,
              norm: float = math.nan, backup: torch.Tensor | None = None) -> tuple[int, float] | None:
        """Applies ``push`` to ``theta`` in place; returns its staleness and mean Gap, or None when
        the result held NaN or Inf and was undone under ``"skip"`` (raises under ``"reject"``).

        Unless non-finite results are applied, θ is copied into ``backup`` (a tensor of θ's shape
        whose contents are garbage, required then) before the update, which is how a non-finite θ is
        undone. The policy's own state (momentum, Gap-Aware's ``v``) is not undone.
        """
        staleness = self.version - push.base_version
        checked = self.nonfinite != "apply"
        if checked:
            backup.copy_(theta)
        gap = self.policy.apply(theta, push.grad, lr=self.lr(), staleness=staleness, stale_theta=stale_theta,
                                worker_id=push.worker_id)
        if checked and not all_finite(theta):
            bad = int((~torch.isfinite(theta)).sum())
            theta.copy_(backup)
            self.nonfinite_updates += 1
            if self.nonfinite == "reject":
                raise NonFiniteUpdate(
                    f"this push would have made {bad} parameters NaN or Inf (the run is diverging): the parameters "
                    "were left as they were; lower the learning rate, or resume from a checkpoint")
            return None
        if self.bound is not None:
            self.bound.accepted(norm)
        self.version += 1
        self.samples += push.samples
        self.window.add(staleness, gap, push.loss)
        self.totals.add(staleness, gap, push.loss)
        return staleness, gap

    def take_window(self) -> Window:
        window, self.window = self.window, Window()
        return window
