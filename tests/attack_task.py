"""A task with a large model and almost no data, for the attacks whose cost is counted in model copies:
``--task tests.attack_task:large`` (the server process imports it from the repository root)."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from gapaware.common.tasks import Task

INPUTS, OUTPUTS = 2048, 4096
"""8.4 million parameters: 32 MiB of float32."""


def large() -> Task:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(16, INPUTS, generator=generator)
    labels = torch.randint(0, OUTPUTS, (16,), generator=generator)
    data = TensorDataset(inputs, labels)
    return Task(nn.Linear(INPUTS, OUTPUTS), nn.functional.cross_entropy, data, data)
