"""Loss, accuracy and a task's own metrics of a model over a whole dataset."""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Callable

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from .data import one_pass


def evaluate(
    model: nn.Module,
    loss: Callable[[Tensor, Tensor], Tensor],
    dataset: Dataset,
    *,
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
) -> tuple[float, float]:
    """Return ``(mean loss, accuracy)`` of ``model`` over every example of ``dataset``; the accuracy
    is NaN where the outputs are not ``(N, C)`` class scores for class-index targets
    (:func:`evaluate_metrics`)."""
    metrics = evaluate_metrics(model, loss, dataset, batch_size=batch_size, device=device)
    return metrics["loss"], metrics.get("accuracy", math.nan)


def evaluate_metrics(
    model: nn.Module,
    loss: Callable[[Tensor, Tensor], Tensor],
    dataset: Dataset,
    *,
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """The mean ``loss`` of ``model`` over every example of ``dataset``, and its ``accuracy`` when
    every batch's outputs are ``(N, C)`` and its targets ``N`` class indices.

    ``loss`` must return the mean over its batch (as ``cross_entropy`` does by default);
    batch means are weighted by batch size, so the result does not depend on
    ``batch_size``. Accuracy is the fraction of examples whose arg-max output is the
    target. ``model`` must already be on ``device``. It runs in eval mode, without
    gradients; each submodule's training flag is restored afterwards. Sums stay on
    ``device`` until the end, so a GPU is not synchronised once per batch.
    """
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    classification = True
    with evaluation_mode(model):
        for inputs, targets in one_pass(dataset, batch_size):
            inputs, targets = inputs.to(device), targets.to(device)
            outputs = model(inputs)
            total_loss += loss(outputs, targets).double() * len(targets)
            classification = classification and _class_scores(outputs, targets)
            if classification:
                correct += (outputs.argmax(dim=1) == targets).sum()
            count += len(targets)
    metrics = {"loss": total_loss.item() / count}
    if classification:
        metrics["accuracy"] = correct.item() / count
    return metrics


def evaluate_task(task, model: nn.Module, *, device: str | torch.device = "cpu") -> dict[str, float]:
    """What the server reports of ``task``'s ``model`` (a :class:`~gapaware.common.tasks.Task`'s):
    :func:`evaluate_metrics`, ``perplexity`` for a language model, and the task's own ``metrics``.
    Raises :class:`TypeError` when those are not a dict of named numbers, and whatever they raise."""
    metrics = evaluate_metrics(model, task.loss, task.test, device=device)
    if task.language_model:
        metrics["perplexity"] = math.exp(min(metrics["loss"], MAX_LOG_PERPLEXITY))
    if task.metrics is not None:
        with evaluation_mode(model):
            own = task.metrics(model, task.test)
        if not isinstance(own, dict) or not all(
                isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in own.items()):
            raise TypeError(f"the task's metrics function returned {own!r}; it must return a dict of "
                            "named numbers, such as {'mae': 0.12}")
        metrics.update({name: float(value) for name, value in own.items()})
    return metrics


MAX_LOG_PERPLEXITY = 700.0
"""exp() of more overflows a float: a perplexity beyond it is reported as exp(700)."""


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode and without gradients; each submodule's training flag restored afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def _class_scores(outputs: Tensor, targets: Tensor) -> bool:
    """Whether ``outputs`` are ``(N, C)`` scores for ``targets``, ``N`` class indices."""
    return (outputs.dim() == 2 and targets.dim() == 1 and len(outputs) == len(targets)
            and not targets.dtype.is_floating_point and not targets.dtype.is_complex and targets.dtype != torch.bool)
