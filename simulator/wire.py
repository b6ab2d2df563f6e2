"""What the wire does to the virtual workers' tensors: the dtypes and codecs a deployed worker can
choose (``--push-dtype``, ``--pull-dtype``), applied with the functions the transport uses, without it.

A push in a transport dtype is rounded to it and back; an 8-bit push is quantised with the worker's
own error feedback and decoded as the server decodes it. An 8-bit pull is the server's delta pull
(its per-worker copy, its full pull at join and every ``full_pull_every`` pulls), added to the
virtual worker's own rebuilt parameters as a deployed worker adds it, so both stay equal bit for bit.
"""
from __future__ import annotations

import torch
from torch import Tensor

from gapaware.common.codecs import CODECS, ErrorFeedback, add_quantized_, dequantize
from gapaware.common.registry import WIRE_DTYPES
from gapaware.server.state import ParameterServerState


class VirtualWire:
    """The wire between ``state`` and the virtual workers ``worker_ids``: pushes in ``push_dtype``, pulls
    in ``pull_dtype`` (names of :data:`~gapaware.common.registry.WIRE_DTYPES`)."""

    def __init__(self, state: ParameterServerState, worker_ids: list[int], push_dtype: str = "float32",
                 pull_dtype: str = "float32") -> None:
        for name in (push_dtype, pull_dtype):
            if name not in WIRE_DTYPES:
                raise ValueError(f"Invalid transport dtype: {name!r} (choose from {', '.join(WIRE_DTYPES)})")
        self.state = state
        self._ids = worker_ids
        self._push_codec = CODECS.get(push_dtype)
        self._push_cast = None if push_dtype in CODECS else getattr(torch, push_dtype)
        self._pull_codec = CODECS.get(pull_dtype)
        self._pull_cast = None if pull_dtype in CODECS else getattr(torch, pull_dtype)
        self._feedback: dict[int, ErrorFeedback] = {}
        self._rebuilt: dict[int, tuple[Tensor, int]] = {}

    def pull(self, worker: int) -> tuple[int, Tensor]:
        """The version and the parameters virtual worker ``worker`` receives (float32, its own tensor)."""
        worker_id = self._ids[worker]
        if self._pull_codec is None:
            version, sent = self.state.pull(worker_id, self._pull_cast)
            return version, sent.float()
        held, base = self._rebuilt.get(worker, (None, 0))
        version, sent = self.state.pull_to_send(worker_id, self._pull_codec, base)
        if sent.delta:
            add_quantized_(held, sent.tensor)
        else:
            held = sent.tensor.clone()
        self._rebuilt[worker] = held, sent.delta_id
        return version, held

    def gradient(self, worker: int, grad: Tensor) -> Tensor:
        """The gradient the server decodes from what virtual worker ``worker`` sends for ``grad``."""
        if self._push_codec is None:
            return grad if self._push_cast == torch.float32 else grad.to(self._push_cast).float()
        feedback = self._feedback.setdefault(worker, ErrorFeedback(self._push_codec, grad.numel()))
        return dequantize(feedback.quantize(grad))
