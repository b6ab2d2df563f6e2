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
    model's size, and ``finite`` says whether every element of it is free of NaN and Inf. ``loss``
    is as the worker sent it: statistics average only finite losses."""

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
          loss: float = math.nan, finite: bool | None = None, max_samples: int | None = None,
          buffers: bytes | None = None, buffers_crc32c: int = 0) -> AdmittedPush:
    """The push, checked; ``finite`` when the caller checked the gradient already (the servicer does,
    chunk by chunk as it arrives), None to check it here. A push claiming more than ``max_samples``
    examples (the server's :attr:`~gapaware.server.state.ParameterServerState.max_samples`) is refused:
    the claim feeds the run's epoch count."""
    if grad.shape != (numel,) or grad.dtype != torch.float32:
        raise BadPush(f"gradient has shape {tuple(grad.shape)} and dtype {grad.dtype}; the model has {numel} "
                      "float32 parameters")
    if max_samples is not None and not 0 <= samples <= max_samples:
        raise BadPush(f"the push claims {samples} examples; one push may hold at most {max_samples} (the training "
                      "set's size, or the run's batch size if larger): nothing was applied")
    return AdmittedPush(worker_id, grad, base_version=base_version, seq=seq, samples=samples, loss=loss,
                        finite=all_finite(grad) if finite is None else finite, buffers=buffers,
                        buffers_crc32c=buffers_crc32c)
