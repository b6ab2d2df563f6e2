"""A push as the server trusts it: validated once, at the door, into an :class:`AdmittedPush`."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gapaware.common.transport import all_finite
from gapaware.server.errors import BadPush


@dataclass(frozen=True, slots=True)
class AdmittedPush:
    """A worker's gradient and what it says of it, checked: ``grad`` is a flat float32 tensor of the
    model's size, and ``finite`` says whether every element of it is free of NaN and Inf."""

    worker_id: int
    grad: torch.Tensor
    base_version: int
    seq: int = 0             # per-worker sequence number for exactly-once; 0 turns the check off
    samples: int = 0         # examples in the batch
    loss: float = math.nan   # the batch's training loss, for metrics
    finite: bool = True
    buffers: bytes | None = None  # the worker's buffers, checked (gapaware.common.buffers); None: not sent
    buffers_crc32c: int = 0


def admit(worker_id: int, grad: torch.Tensor, *, numel: int, base_version: int, seq: int = 0, samples: int = 0,
          loss: float = math.nan, finite: bool | None = None, buffers: bytes | None = None,
          buffers_crc32c: int = 0) -> AdmittedPush:
    """The push, checked; ``finite`` when the caller checked the gradient already (the servicer does,
    chunk by chunk as it arrives), None to check it here."""
    if grad.shape != (numel,) or grad.dtype != torch.float32:
        raise BadPush(f"gradient has shape {tuple(grad.shape)} and dtype {grad.dtype}; the model has {numel} "
                      "float32 parameters")
    return AdmittedPush(worker_id, grad, base_version=base_version, seq=seq, samples=samples, loss=loss,
                        finite=all_finite(grad) if finite is None else finite, buffers=buffers,
                        buffers_crc32c=buffers_crc32c)
