"""Batches of a dataset: an endless shuffled stream for training, one ordered pass for evaluation."""
from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset


def batches(dataset: Dataset, batch_size: int, *, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield training batches forever, each epoch in a fresh random order.

    The permutations come from one ``torch.Generator`` seeded with ``seed``, so the stream
    is reproducible and does not touch the global RNG. Every example appears exactly once
    per epoch: an epoch is ``ceil(len(dataset) / batch_size)`` batches, the last one smaller
    when the size does not divide evenly (nothing dropped, nothing wrapped into the next).
    Arguments are checked on the call, not on the first ``next``.
    """
    _check(dataset, batch_size)
    return _epochs(dataset, batch_size, torch.Generator().manual_seed(seed))


def _epochs(dataset: Dataset, batch_size: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
    while True:
        yield from one_pass(dataset, batch_size, order=torch.randperm(len(dataset), generator=generator))


def one_pass(
    dataset: Dataset, batch_size: int, order: Tensor | None = None
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield the batches of one epoch, in ``order`` (a permutation of indices) or in dataset order.

    A ``TensorDataset`` is indexed directly, a whole batch per indexing; any other dataset
    goes through a ``DataLoader`` and its default collation. Both give the same batches.
    """
    _check(dataset, batch_size)
    if isinstance(dataset, TensorDataset):
        for start in range(0, len(dataset), batch_size):
            index = slice(start, start + batch_size) if order is None else order[start : start + batch_size]
            yield tuple(tensor[index] for tensor in dataset.tensors)
    else:
        sampler = None if order is None else order.tolist()
        yield from DataLoader(dataset, batch_size=batch_size, sampler=sampler)


def _check(dataset: Dataset, batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"Invalid batch size: {batch_size} (must be >= 1)")
    if len(dataset) == 0:
        raise ValueError("the dataset is empty")
