"""Loss and accuracy of a model over a whole dataset."""
from __future__ import annotations

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
    """Return ``(mean loss, accuracy)`` of ``model`` over every example of ``dataset``.

    ``loss`` must return the mean over its batch (as ``cross_entropy`` does by default);
    batch means are weighted by batch size, so the result does not depend on
    ``batch_size``. Accuracy is the fraction of examples whose arg-max output is the
    target. ``model`` must already be on ``device``. It runs in eval mode, without
    gradients; each submodule's training flag is restored afterwards. Sums stay on
    ``device`` until the end, so a GPU is not synchronised once per batch.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    try:
        with torch.no_grad():
            for inputs, targets in one_pass(dataset, batch_size):
                inputs, targets = inputs.to(device), targets.to(device)
                outputs = model(inputs)
                total_loss += loss(outputs, targets).double() * len(targets)
                correct += (outputs.argmax(dim=1) == targets).sum()
                count += len(targets)
    finally:
        for module, training in modes:
            module.training = training
    return total_loss.item() / count, correct.item() / count
