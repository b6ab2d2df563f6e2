"""Users' tasks that define their own evaluation, for tests: a regression, a sequence model and a
metrics function that raises."""
from __future__ import annotations

import threading

import torch
from torch import nn
from torch.utils.data import TensorDataset

from gapaware.common.tasks import Task

VOCABULARY, LENGTH = 7, 5


def _mean_absolute_error(model: nn.Module, test: TensorDataset) -> dict[str, float]:
    inputs, targets = test.tensors
    return {"mae": (model(inputs).squeeze(1) - targets).abs().mean().item()}


def regression() -> Task:
    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(600, 4, generator=generator)
    targets = inputs @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(600, generator=generator)
    return Task(model=nn.Linear(4, 1), loss=lambda out, y: nn.functional.mse_loss(out.squeeze(1), y),
                train=TensorDataset(inputs[:500], targets[:500]), test=TensorDataset(inputs[500:], targets[500:]),
                metrics=_mean_absolute_error)


def _token_accuracy(model: nn.Module, test: TensorDataset) -> dict[str, float]:
    inputs, targets = test.tensors
    return {"token_accuracy": (model(inputs).argmax(-1) == targets).float().mean().item()}


def sequence() -> Task:
    """Predict the next token of sequences counting up modulo the vocabulary: outputs ``(N, T, V)``."""
    starts = torch.randint(0, VOCABULARY, (400, 1), generator=torch.Generator().manual_seed(4))
    tokens = (starts + torch.arange(LENGTH + 1)) % VOCABULARY
    data = TensorDataset(tokens[:, :-1], tokens[:, 1:])
    model = nn.Sequential(nn.Embedding(VOCABULARY, 16), nn.Linear(16, VOCABULARY))
    return Task(model=model, loss=lambda out, y: nn.functional.cross_entropy(out.flatten(0, 1), y.flatten()),
                train=data, test=data, metrics=_token_accuracy, language_model=True)


def _broken(model: nn.Module, test: TensorDataset) -> dict[str, float]:
    raise RuntimeError("the user's evaluation code is broken")


def raising() -> Task:
    task = regression()
    task.metrics = _broken
    return task


class _FailsInTraining(nn.Linear):
    def forward(self, inputs):
        if self.training:
            raise RuntimeError("this model cannot train")
        return super().forward(inputs)


def crashes_in_training() -> Task:
    """A task whose every worker dies at its first batch, while the server's evaluation works."""
    task = regression()
    task.model = _FailsInTraining(4, 1)
    return task


EVALUATING = threading.Event()
"""Set while :func:`held`'s metrics function runs; it returns once ``RELEASE`` is set."""
RELEASE = threading.Event()


def _held_metrics(model: nn.Module, test: TensorDataset) -> dict[str, float]:
    EVALUATING.set()
    RELEASE.wait(timeout=60)
    return {}


def held() -> Task:
    """A task whose evaluation lasts until the test releases it: updates outpace it."""
    task = regression()
    task.metrics = _held_metrics
    return task
