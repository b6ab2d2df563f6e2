"""A push run slice by slice on the CPU, so that its temporaries are small and stay in cache.

Every update rule of ALGORITHMS.md is element-wise but for the version counter and ``η_max``
(ALGORITHMS.md, "Sharding"; Barkai, Hakimi and Schuster, ICLR 2020,
https://arxiv.org/abs/1909.10802): a slice of the parameters is updated by the same rule, on the
same slices of the other tensors. Run on the whole vector, a push's torch operations each pass
over the whole of memory and each temporary (``g + λ·θ``, GA's Gap) is a fresh tensor of the
model's size, whose page faults cost more than the arithmetic. Run on slices of :data:`SLICE`
elements, the temporaries are small and reused by the allocator, and a slice written by one
operation is still in cache for the next. Other devices get the whole vector in one piece.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import Tensor

SLICE = 1 << 18
"""Elements per slice on the CPU (1 MiB of float32 per tensor)."""

R = TypeVar("R")


def in_slices(push: Callable[..., R], *tensors: Tensor | None, **keywords: Tensor | float | bool | None) -> list[R]:
    """``push(*slices, **keywords)`` for each slice of ``tensors`` (flat, of one length, the first
    never None; a None passes through), in order; what each call returned. A keyword that is a
    tensor (the per-element rates of :mod:`.groups`) is sliced alike; the others pass as they are."""
    first = tensors[0]
    size = SLICE if first.device.type == "cpu" else first.numel()
    return [push(*(None if t is None else t[start:start + size] for t in tensors),
                 **{key: value[start:start + size] if isinstance(value, Tensor) else value
                    for key, value in keywords.items()})
            for start in range(0, first.numel(), size)]
