"""Flat models of a given size in bytes, as ``--task bench.models:flat_25mib`` factories.

The benchmarks move parameters and gradients, not compute: the model is one flat float32
parameter of the named size whose first few elements make a tiny linear classifier, so a task
builds in milliseconds and a worker's step costs nothing but the transfer.
"""
from __future__ import annotations

import dataclasses
import functools
import time

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from gapaware.common.tasks import Task, load_task

MIB = 1024 * 1024
FEATURES, CLASSES = 8, 2


class FlatModel(nn.Module):
    def __init__(self, numel: int) -> None:
        super().__init__()
        if numel < FEATURES * CLASSES:
            raise ValueError(f"a flat model needs at least {FEATURES * CLASSES} parameters, got {numel}")
        self.weight = nn.Parameter(torch.randn(numel) * 0.01)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs @ self.weight[:FEATURES * CLASSES].view(FEATURES, CLASSES)


def flat_task(nbytes: int) -> Task:
    """A :class:`Task` whose model holds ``nbytes`` of float32 parameters."""
    inputs = torch.randn(64, FEATURES)
    targets = (inputs[:, 0] > 0).long()
    data = TensorDataset(inputs, targets)
    return Task(model=FlatModel(nbytes // 4), loss=nn.functional.cross_entropy, train=data, test=data)


flat_64kib = functools.partial(flat_task, 64 * 1024)
flat_1mib = functools.partial(flat_task, MIB)
flat_25mib = functools.partial(flat_task, 25 * MIB)
flat_100mib = functools.partial(flat_task, 100 * MIB)

TASKS = {64 * 1024: "bench.models:flat_64kib", MIB: "bench.models:flat_1mib",
         25 * MIB: "bench.models:flat_25mib", 100 * MIB: "bench.models:flat_100mib"}


class SlowLoadingDataset(Dataset):
    """``dataset`` whose every item takes ``seconds`` to load, as from a network file system: a
    ``Dataset`` that is not a ``TensorDataset`` goes through a ``DataLoader``, item by item."""

    def __init__(self, dataset: Dataset, seconds: float) -> None:
        self._dataset = dataset
        self._seconds = seconds

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, index: int):
        time.sleep(self._seconds)
        return self._dataset[index]


def slow_loading_digits() -> Task:
    """digits-mlp whose training examples each wait 50 µs to load (``time.sleep``: on Linux about 0.14 ms)."""
    task = load_task("digits-mlp")
    return dataclasses.replace(task, train=SlowLoadingDataset(task.train, 50e-6))
