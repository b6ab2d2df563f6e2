"""The parameter layout: which named tensors, of which shapes, make up the flat vector.

Server and workers exchange one flat float32 vector; the layout says how it maps
onto the model's parameters (in ``model.named_parameters()`` order), which buffers
travel beside it (:mod:`gapaware.common.buffers`), and its fingerprint lets the
server refuse a worker whose model differs.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from gapaware.common.buffers import BufferSpec, buffer_specs
from gapaware.proto import parameter_server_pb2 as pb


@dataclass(frozen=True)
class ParamLayout:
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    buffers: tuple[BufferSpec, ...] = ()

    @classmethod
    def from_module(cls, model: nn.Module) -> ParamLayout:
        named = list(model.named_parameters())
        return cls(tuple(n for n, _ in named), tuple(tuple(p.shape) for _, p in named), buffer_specs(model))

    @classmethod
    def from_proto(cls, message: pb.ParamLayout) -> ParamLayout:
        return cls(tuple(p.name for p in message.params), tuple(tuple(p.shape) for p in message.params),
                   tuple(BufferSpec(b.name, tuple(b.shape), b.dtype) for b in message.buffers))

    def to_proto(self) -> pb.ParamLayout:
        return pb.ParamLayout(
            params=[pb.ParamSpec(name=n, shape=s) for n, s in zip(self.names, self.shapes)],
            fingerprint=self.fingerprint,
            buffers=[pb.BufferSpec(name=b.name, shape=b.shape, dtype=b.dtype) for b in self.buffers],
        )

    @property
    def numel(self) -> int:
        return sum(_prod(s) for s in self.shapes)

    @property
    def fingerprint(self) -> str:
        described = [[n, list(s)] for n, s in zip(self.names, self.shapes)]
        if self.buffers:
            described.append([[b.name, list(b.shape), b.dtype] for b in self.buffers])
        text = json.dumps(described)
        return hashlib.sha256(text.encode()).hexdigest()

    def describe_mismatch(self, other: ParamLayout) -> str | None:
        """A sentence saying how ``other`` differs from this layout, or None when equal."""
        if self == other:
            return None
        for i, (mine, theirs) in enumerate(zip(zip(self.names, self.shapes), zip(other.names, other.shapes))):
            if mine != theirs:
                return (f"parameter #{i} is {theirs[0]} {list(theirs[1])} but the server's model has "
                        f"{mine[0]} {list(mine[1])}")
        if (self.names, self.shapes) != (other.names, other.shapes):
            return (f"the model has {len(other.names)} parameter tensors ({other.numel} elements) but the "
                    f"server's has {len(self.names)} ({self.numel} elements)")
        return (f"the model's buffers are {_describe(other.buffers)} but the server's model has "
                f"{_describe(self.buffers)}")


def _describe(buffers: tuple[BufferSpec, ...]) -> str:
    return ", ".join(f"{b.name} {list(b.shape)} {b.dtype}" for b in buffers) or "none"


def _prod(shape: tuple[int, ...]) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total


def flat_parameters(model: nn.Module) -> torch.Tensor:
    """The model's parameters as one new flat float32 CPU tensor (``parameters_to_vector``
    concatenates, which copies; a cast or device copy may follow, never a third copy)."""
    return parameters_to_vector(model.parameters()).detach().to("cpu", torch.float32)


def load_flat_parameters(model: nn.Module, flat: torch.Tensor) -> None:
    """Makes the model's parameters views of ``flat`` (``vector_to_parameters``: no copy), or of a
    copy of it on the model's device when it lives elsewhere. Writing into ``flat`` later changes
    the model."""
    with torch.no_grad():
        device = next(model.parameters()).device
        vector_to_parameters(flat.to(device, non_blocking=True), model.parameters())


def flat_gradients(model: nn.Module, out: torch.Tensor | None = None) -> torch.Tensor:
    """The model's gradients as one flat float32 CPU tensor; zeros where a parameter has none.

    ``out``, a flat float32 CPU tensor of the model's size, receives them when the gradients are
    float32 CPU tensors (reused every step, it saves a model-sized allocation); otherwise a new
    tensor is returned.
    """
    parts = [
        (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
        for p in model.parameters()
    ]
    if out is not None and all(part.device.type == "cpu" and part.dtype == torch.float32 for part in parts):
        return torch.cat(parts, out=out).detach()
    return torch.cat(parts).detach().to("cpu", torch.float32)
