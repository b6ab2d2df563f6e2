"""Turns admitted pushes into updates of θ: the policy, the learning-rate schedule, what a NaN or Inf
gradient gets, and the statistics of the pushes applied. Not thread-safe: the owner holds its lock."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from gapaware.common.registry import NONFINITE_ACTIONS
from gapaware.common.config import RunConfig, learning_rate
from gapaware.server.errors import NonFiniteGradient
from gapaware.server.policies import Policy, make_policy
from gapaware.server.push import AdmittedPush


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


def policy_for(config: RunConfig, numel: int) -> Policy:
    """The policy ``config`` names, with the run's hyper-parameters."""
    return make_policy(config.policy, numel, momentum=config.momentum, nesterov=config.nesterov,
                       weight_decay=config.weight_decay, ga_beta=config.ga_beta, ga_eps=config.ga_eps)


class Updater:
    """Applies pushes with the run's policy at the scheduled learning rate, counting them.

    ``version`` is the number of updates applied; ``window`` sums the pushes since the last
    evaluation took it, ``totals`` those of the whole run. A gradient with NaN or Inf elements is
    refused (``nonfinite="reject"``), acknowledged and dropped (``"skip"``) or applied as it is
    (``"apply"``, for the simulator to show divergence), and counted in ``nonfinite_pushes``.
    """

    def __init__(self, config: RunConfig, numel: int, total_updates: int, nonfinite: str = "reject") -> None:
        if nonfinite not in NONFINITE_ACTIONS:
            raise ValueError(f"Invalid non-finite action: {nonfinite!r} (choose from {', '.join(NONFINITE_ACTIONS)})")
        self.config = config
        self.policy = policy_for(config, numel)
        self.total_updates = total_updates
        self.nonfinite = nonfinite
        self.nonfinite_pushes = 0
        self.version = 0
        self.samples = 0
        self.window = Window()
        self.totals = Window()

    def lr(self) -> float:
        return learning_rate(self.config, self.version, self.total_updates)

    def drops(self, push: AdmittedPush) -> bool:
        """Whether ``push`` is dropped for holding NaN or Inf; raises when such a push is refused."""
        if push.finite:
            return False
        self.nonfinite_pushes += 1
        if self.nonfinite == "reject":
            bad = int((~torch.isfinite(push.grad)).sum())
            raise NonFiniteGradient(
                f"gradient has {bad} NaN or Inf elements (of {push.grad.numel()}): nothing was applied; "
                "lower the learning rate or clip gradients, or start the server with --nonfinite skip")
        return self.nonfinite == "skip"

    def apply(self, theta: torch.Tensor, push: AdmittedPush, stale_theta: torch.Tensor | None) -> tuple[int, float]:
        """Applies ``push`` to ``theta`` in place; returns its staleness and mean Gap."""
        staleness = self.version - push.base_version
        gap = self.policy.apply(theta, push.grad, lr=self.lr(), staleness=staleness, stale_theta=stale_theta,
                                worker_id=push.worker_id)
        self.version += 1
        self.samples += push.samples
        self.window.add(staleness, gap, push.loss)
        self.totals.add(staleness, gap, push.loss)
        return staleness, gap

    def take_window(self) -> Window:
        window, self.window = self.window, Window()
        return window
