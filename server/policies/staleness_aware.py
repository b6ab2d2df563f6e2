"""SA, staleness-aware ASGD: divide the learning rate of a push by its staleness.

Zhang, Gupta, Lian and Liu, "Staleness-aware Async-SGD for Distributed Deep Learning",
IJCAI 2016 (https://arxiv.org/abs/1511.05950). The common SGD step of ALGORITHMS.md on
``d = g + λ·θ`` with the learning rate of this update::

    η_τ = η / max(1, τ)
"""
from __future__ import annotations

from torch import Tensor

from .asgd import ASGD


def staleness_aware_lr(lr: float, staleness: int) -> float:
    """``η / max(1, τ)``: a fresh push (τ = 0) and a push one update late get the full ``η``."""
    return lr / max(1, staleness)


class StalenessAware(ASGD):
    """SA: ASGD whose learning rate is divided by the staleness τ of each push.

    Args: see :class:`~.base.Policy`.
    """

    name = "staleness-aware"

    def apply(self, theta: Tensor, grad: Tensor, *, lr: float, staleness: int,
              stale_theta: Tensor | None = None, worker_id: int = 0) -> float:
        return super().apply(theta, grad, lr=staleness_aware_lr(lr, staleness), staleness=staleness,
                             stale_theta=stale_theta, worker_id=worker_id)
