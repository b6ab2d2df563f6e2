"""Simulated time: how long each virtual worker takes per batch, and the order batches finish in.

Barkai, Hakimi and Schuster (ICLR 2020, section 5) simulate asynchrony on one machine: each
worker's time per batch is drawn from a gamma distribution (the model of Ali et al. 2000 for
task times on heterogeneous machines) and gradients are applied in the order they complete.
With N workers always busy, a gradient then waits on average for the N−1 others: mean
staleness ≈ N−1.
"""
from __future__ import annotations

import heapq

import numpy as np


class WorkerClocks:
    """Per-worker batch times drawn from gamma distributions.

    Worker ``i`` draws from ``Gamma(shape, mean_i / shape)``: mean ``mean_i``, coefficient of
    variation ``1/sqrt(shape)``. Homogeneous (default): ``mean_i = 1`` for every worker.
    ``heterogeneous``: each ``mean_i`` is itself drawn once from ``Gamma(shape, 1 / shape)``, so
    some machines are persistently slower than others, as in a non-dedicated cloud.

    Every worker has its own random stream, derived from ``(seed, i)`` alone: worker ``i`` draws
    the same times whatever the number of workers or the policy, so policies compared at the
    same seed see exactly the same arrival order.
    """

    def __init__(self, workers: int, *, seed: int, shape: float, heterogeneous: bool = False) -> None:
        if workers < 1:
            raise ValueError(f"Invalid number of workers: {workers}")
        if not shape > 0:
            raise ValueError(f"Invalid gamma shape: {shape} (must be > 0)")
        streams = np.random.SeedSequence([seed, 0]).spawn(workers)
        self._rngs = [np.random.default_rng(stream) for stream in streams]
        self.shape = float(shape)
        if heterogeneous:  # the i-th draw of one stream: worker i's mean does not depend on N either
            self.means = np.random.default_rng([seed, 1]).gamma(shape, 1.0 / shape, size=workers)
        else:
            self.means = np.ones(workers)

    @property
    def workers(self) -> int:
        return len(self._rngs)

    def draw(self, worker: int) -> float:
        """The time ``worker`` takes for its next batch."""
        return float(self._rngs[worker].gamma(self.shape, self.means[worker] / self.shape))


class CompletionQueue:
    """Batches in flight, popped in order of completion time (ties: lower worker index first)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int]] = []

    def add(self, finish_time: float, worker: int) -> None:
        heapq.heappush(self._heap, (finish_time, worker))

    def pop(self) -> tuple[float, int]:
        """``(finish_time, worker)`` of the batch that completes first."""
        return heapq.heappop(self._heap)
