"""Users' tasks for the parameter-group and dtype tests: three well-separated blobs in 2-D, a small
MLP, one with a frozen first layer, and the same model in float64 and bfloat16."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from gapaware.common.tasks import Task

CENTRES = torch.tensor([[2.0, 0.0], [-2.0, 1.0], [0.0, -2.0]])
OUTPUT_DTYPES: set[torch.dtype] = set()
"""The dtypes of the model outputs the loss has seen in this process (the autocast test reads it)."""


def _loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    OUTPUT_DTYPES.add(outputs.dtype)
    return nn.functional.cross_entropy(outputs, targets)


def _blobs(count: int, generator: torch.Generator, dtype: torch.dtype) -> TensorDataset:
    targets = torch.randint(0, 3, (count,), generator=generator)
    inputs = CENTRES[targets] + 0.5 * torch.randn(count, 2, generator=generator)
    return TensorDataset(inputs.to(dtype), targets)


def _task(dtype: torch.dtype = torch.float32, *, freeze_first: bool = False) -> Task:
    generator = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 3)).to(dtype)
    if freeze_first:
        model[0].requires_grad_(False)
    return Task(model=model, loss=_loss, train=_blobs(1500, generator, dtype),
                test=_blobs(300, generator, dtype))


def plain() -> Task:
    return _task()


def frozen() -> Task:
    return _task(freeze_first=True)


def float64() -> Task:
    return _task(torch.float64)


def bfloat16() -> Task:
    return _task(torch.bfloat16)


def float16() -> Task:
    return _task(torch.float16)
