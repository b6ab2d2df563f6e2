"""The virtual workers' gradients: one model shared by all of them, one forward/backward per batch."""
from __future__ import annotations

import torch
from torch import Tensor

from gapaware.common.data import batches
from gapaware.common.evaluation import evaluate
from gapaware.common.layout import flat_gradients, load_flat_parameters
from gapaware.common.tasks import Task


class GradientSource:
    """Computes the gradient a virtual worker pushes, on the parameters that worker pulled.

    The simulator holds one model and loads each worker's parameters into it before that
    worker's forward/backward, so N workers cost one model, not N. Worker ``i`` reads its own
    endless shuffled stream of the training set (seeded by ``seed`` and ``i``), as a deployed
    worker does. Buffers such as BatchNorm statistics are shared by the virtual workers and
    updated by every batch.
    """

    def __init__(self, task: Task, *, workers: int, batch_size: int, seed: int, device: str = "cpu") -> None:
        self.model = task.model.to(device)
        self.model.train()
        self.loss = task.loss
        self.augment = task.augment
        self._augmenting = torch.Generator(device=device).manual_seed(seed) if task.augment else None
        self.test = task.test
        self.device = device
        self._streams = [batches(task.train, batch_size, seed=seed * 1_000_003 + worker)
                         for worker in range(workers)]

    def compute(self, worker: int, theta: Tensor) -> tuple[Tensor, float]:
        """``worker``'s gradient on its next batch at ``theta`` (flat, on the CPU) and the batch loss."""
        load_flat_parameters(self.model, theta)
        inputs, targets = (t.to(self.device, non_blocking=True) for t in next(self._streams[worker]))
        if self._augmenting is not None:
            inputs = self.augment(inputs, self._augmenting)
        self.model.zero_grad(set_to_none=True)
        loss = self.loss(self.model(inputs), targets)
        loss.backward()
        return flat_gradients(self.model), loss.item()

    def test_metrics(self, theta: Tensor) -> tuple[float, float]:
        """``(loss, accuracy)`` on the held-out split at ``theta``."""
        load_flat_parameters(self.model, theta)
        return evaluate(self.model, self.loss, self.test, device=self.device)
