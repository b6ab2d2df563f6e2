"""A user's task with BatchNorm, for tests: inputs with a large mean, so a model evaluated with
BatchNorm's initial statistics (mean 0, variance 1) instead of its running ones scores far worse."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from gapaware.common.tasks import Task

OFFSET = 6.0


def _blobs(count: int, generator: torch.Generator) -> TensorDataset:
    targets = torch.randint(0, 3, (count,), generator=generator)
    centres = torch.tensor([[1.0, 0.0], [-1.0, 0.5], [0.0, -1.0]])
    inputs = centres[targets] + 0.4 * torch.randn(count, 2, generator=generator) + OFFSET
    return TensorDataset(inputs, targets)


def task() -> Task:
    generator = torch.Generator().manual_seed(5)
    model = nn.Sequential(nn.Linear(2, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    return Task(model=model, loss=nn.functional.cross_entropy, train=_blobs(2000, generator),
                test=_blobs(500, generator))
