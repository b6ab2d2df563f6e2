"""The model's buffers (BatchNorm's ``running_mean``/``running_var``/``num_batches_tracked``, any
registered persistent buffer): what they are, and how they travel as one small byte string.

Buffers are not trained by gradients, so they cannot ride in the flat float32 vector; yet a model
evaluated without them (BatchNorm with its initial statistics) scores as if untrained. They are a
few kilobytes even for a ResNet, so they travel whole in the push and pull headers, each buffer's
raw little-endian bytes in its own dtype (integer buffers stay integers), concatenated in layout
order, with the CRC-32C of the whole string: checked like a chunk of the transport.
"""
from __future__ import annotations

from dataclasses import dataclass

import crc32c
import torch
from torch import nn

from gapaware.common.transport import TransportError

MAX_BUFFER_BYTES = 4 * 1024 * 1024
"""Buffers travel in message headers: more than this is refused when the layout is built."""


@dataclass(frozen=True)
class BufferSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # torch's name without the prefix: "float32", "int64", ...

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def nbytes(self) -> int:
        numel = 1
        for dim in self.shape:
            numel *= dim
        return numel * torch.empty((), dtype=self.torch_dtype).element_size()


def buffer_specs(model: nn.Module) -> tuple[BufferSpec, ...]:
    """The model's persistent buffers, in ``state_dict()`` order (non-persistent ones are not part
    of the model's state and stay on each side)."""
    persistent = set(model.state_dict(keep_vars=True))
    specs = tuple(BufferSpec(name, tuple(buffer.shape), str(buffer.dtype).removeprefix("torch."))
                  for name, buffer in model.named_buffers() if name in persistent)
    total = sum(spec.nbytes for spec in specs)
    if total > MAX_BUFFER_BYTES:
        raise ValueError(f"the model's buffers hold {total} bytes; gapaware sends buffers of at most "
                         f"{MAX_BUFFER_BYTES} bytes with every push")
    return specs


def pack_buffers(tensors: dict[str, torch.Tensor], specs: tuple[BufferSpec, ...]) -> bytes:
    """``tensors`` (by name: the model's ``named_buffers()`` or :func:`unpack_buffers`'s) as one byte string."""
    return b"".join(tensors[spec.name].detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
                    .numpy().tobytes() for spec in specs)


def model_buffers(model: nn.Module, specs: tuple[BufferSpec, ...]) -> bytes:
    return pack_buffers(dict(model.named_buffers()), specs)


def checksum(data: bytes) -> int:
    return crc32c.crc32c(data)


def unpack_buffers(data: bytes, crc: int, specs: tuple[BufferSpec, ...]) -> dict[str, torch.Tensor]:
    """The buffers in ``data``, checked against ``crc`` and the layout; raises :class:`TransportError`."""
    expected = sum(spec.nbytes for spec in specs)
    if len(data) != expected:
        raise TransportError(f"buffers: {len(data)} bytes, the model's {len(specs)} buffers hold {expected}")
    if checksum(data) != crc:
        raise TransportError("buffers: CRC-32C mismatch: corrupted in transit")
    tensors, offset = {}, 0
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    for spec in specs:
        # A tensor of its own each: safetensors refuses to save views of one storage.
        tensors[spec.name] = raw[offset:offset + spec.nbytes].view(spec.torch_dtype).reshape(spec.shape).clone()
        offset += spec.nbytes
    return tensors


def load_buffers(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copies ``tensors`` into the model's buffers of the same names, in place (on the model's device)."""
    own = dict(model.named_buffers())
    with torch.no_grad():
        for name, tensor in tensors.items():
            own[name].copy_(tensor)
