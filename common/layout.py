"""The parameter layout: which named tensors, of which shapes and dtypes, make up the flat vector.

Server and workers exchange one flat float32 vector; the layout says how it maps onto the model's
trainable parameters (``requires_grad``, in ``model.named_parameters()`` order), which buffers travel
beside it (:mod:`gapaware.common.buffers`), and its fingerprint lets the server refuse a worker whose
model differs.

A parameter of any floating dtype (float16, bfloat16, float64) trains: the flat vector, and so the
server's master copy, is float32 whatever the model's dtypes; a worker casts what it loads into
each parameter's own dtype and sends float32 gradients (docs/ALGORITHMS.md#dtypes).

Frozen parameters (``requires_grad=False``) are fixed state: not in the flat vector, never sent nor
updated. Each side builds them from the task (same seed, same files); the layout lists them with
the CRC-32C of their bytes, so a worker whose frozen values differ from the server's is refused at
Join. The server's model holds them as built, for evaluation; checkpoints do not store them, and
``gapaware export`` rebuilds them with the task, so the exported ``state_dict()`` is complete.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from google.protobuf import json_format
from torch import nn

from gapaware.common.buffers import BufferSpec, buffer_specs, checksum, pack_buffers
from gapaware.proto import parameter_server_pb2 as pb

FLOAT32 = "float32"


@dataclass(frozen=True)
class ParamLayout:
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    buffers: tuple[BufferSpec, ...] = ()
    dtypes: tuple[str, ...] = ()              # each parameter's own dtype; () is float32 for all
    frozen: tuple[BufferSpec, ...] = ()       # parameters with requires_grad=False, fixed state
    frozen_crc32c: int = 0                    # of the frozen parameters' bytes, in order

    def __post_init__(self) -> None:
        if not self.dtypes:
            object.__setattr__(self, "dtypes", (FLOAT32,) * len(self.names))

    @classmethod
    def from_module(cls, model: nn.Module) -> ParamLayout:
        """The layout of ``model``; raises ``ValueError`` for a trainable parameter that is not of a
        real floating dtype (complex parameters cannot travel as float32)."""
        trainable = trainable_parameters(model)
        for name, parameter in trainable:
            if not parameter.is_floating_point():
                raise ValueError(f"parameter {name} is {parameter.dtype}: gapaware trains parameters of real "
                                 "floating dtypes (float16, bfloat16, float32, float64); freeze it "
                                 "(requires_grad=False) or make it a buffer")
        frozen = [(name, p) for name, p in model.named_parameters() if not p.requires_grad]
        frozen_specs = tuple(BufferSpec(name, tuple(p.shape), _dtype_name(p.dtype)) for name, p in frozen)
        return cls(tuple(n for n, _ in trainable), tuple(tuple(p.shape) for _, p in trainable), buffer_specs(model),
                   tuple(_dtype_name(p.dtype) for _, p in trainable), frozen_specs,
                   checksum(pack_buffers(dict(frozen), frozen_specs)) if frozen else 0)

    @classmethod
    def from_proto(cls, message: pb.ParamLayout) -> ParamLayout:
        return cls(tuple(p.name for p in message.params), tuple(tuple(p.shape) for p in message.params),
                   tuple(_spec(b) for b in message.buffers), tuple(p.dtype or FLOAT32 for p in message.params),
                   tuple(_spec(b) for b in message.frozen), message.frozen_crc32c)

    def to_proto(self) -> pb.ParamLayout:
        return pb.ParamLayout(
            params=[pb.ParamSpec(name=n, shape=s, dtype="" if d == FLOAT32 else d)
                    for n, s, d in zip(self.names, self.shapes, self.dtypes)],
            fingerprint=self.fingerprint,
            buffers=[_proto_spec(b) for b in self.buffers],
            frozen=[_proto_spec(b) for b in self.frozen],
            frozen_crc32c=self.frozen_crc32c,
        )

    def to_json(self) -> dict:
        """The layout as a JSON object (protobuf's JSON mapping of :meth:`to_proto`), for checkpoints."""
        return json_format.MessageToDict(self.to_proto())

    @classmethod
    def from_json(cls, data: dict) -> ParamLayout:
        """The layout :meth:`to_json` wrote; raises ``ValueError`` for anything else, or a fingerprint that
        is not the layout's own."""
        try:
            message = json_format.ParseDict(data, pb.ParamLayout())
        except json_format.ParseError as error:
            raise ValueError(f"not a parameter layout: {error}") from None
        layout = cls.from_proto(message)
        if message.fingerprint != layout.fingerprint:
            raise ValueError("the layout's fingerprint is not that of the parameters it lists")
        return layout

    @property
    def numel(self) -> int:
        return sum(_prod(s) for s in self.shapes)

    @property
    def fingerprint(self) -> str:
        # float32 parameters, and a model without buffers or frozen parameters, are described as they
        # were before dtypes and frozen parameters were: the fingerprints of such models do not change.
        described = [[n, list(s)] if d == FLOAT32 else [n, list(s), d]
                     for n, s, d in zip(self.names, self.shapes, self.dtypes)]
        if self.buffers:
            described.append([[b.name, list(b.shape), b.dtype] for b in self.buffers])
        if self.frozen:
            described.append(["frozen", [[b.name, list(b.shape), b.dtype] for b in self.frozen], self.frozen_crc32c])
        text = json.dumps(described)
        return hashlib.sha256(text.encode()).hexdigest()

    def segments(self) -> list[tuple[str, tuple[int, ...], int, int]]:
        """``(name, shape, start, stop)`` of each trainable parameter in the flat vector."""
        out, start = [], 0
        for name, shape in zip(self.names, self.shapes):
            out.append((name, shape, start, start + _prod(shape)))
            start += _prod(shape)
        return out

    def describe_mismatch(self, other: ParamLayout) -> str | None:
        """A sentence saying how ``other`` differs from this layout, or None when equal."""
        if self == other:
            return None
        mine_all = list(zip(self.names, self.shapes, self.dtypes))
        for i, (mine, theirs) in enumerate(zip(mine_all, zip(other.names, other.shapes, other.dtypes))):
            if mine != theirs:
                return (f"parameter #{i} is {theirs[0]} {list(theirs[1])} {theirs[2]} but the server's model has "
                        f"{mine[0]} {list(mine[1])} {mine[2]}")
        if (self.names, self.shapes) != (other.names, other.shapes):
            return (f"the model has {len(other.names)} trainable parameter tensors ({other.numel} elements) but "
                    f"the server's has {len(self.names)} ({self.numel} elements)")
        if self.frozen != other.frozen:
            return (f"the model's frozen parameters are {_describe(other.frozen)} but the server's model has "
                    f"{_describe(self.frozen)}")
        if self.frozen_crc32c != other.frozen_crc32c:
            return ("the model's frozen parameters (requires_grad=False) hold other values than the server's: "
                    "both sides must build them alike (the same seed, the same pretrained files)")
        return (f"the model's buffers are {_describe(other.buffers)} but the server's model has "
                f"{_describe(self.buffers)}")


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters that make up the flat vector: those with ``requires_grad``, in order."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _spec(message: pb.BufferSpec) -> BufferSpec:
    return BufferSpec(message.name, tuple(message.shape), message.dtype)


def _proto_spec(spec: BufferSpec) -> pb.BufferSpec:
    return pb.BufferSpec(name=spec.name, shape=spec.shape, dtype=spec.dtype)


def _describe(buffers: tuple[BufferSpec, ...]) -> str:
    return ", ".join(f"{b.name} {list(b.shape)} {b.dtype}" for b in buffers) or "none"


def _prod(shape: tuple[int, ...]) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total


def flat_parameters(model: nn.Module) -> torch.Tensor:
    """The model's trainable parameters as one new flat float32 CPU tensor."""
    parts = [p.detach().reshape(-1) for _, p in trainable_parameters(model)]
    return torch.cat([part.to("cpu", torch.float32) for part in parts])


def load_flat_parameters(model: nn.Module, flat: torch.Tensor) -> None:
    """Loads ``flat`` (float32, CPU) into the model's trainable parameters.

    A float32 model on the CPU is made a view of ``flat`` (``vector_to_parameters``: no copy; writing
    into ``flat`` later changes the model); parameters of another dtype or device get a copy cast
    into their own dtype, in place (the model keeps its dtypes and its parameter objects).
    """
    with torch.no_grad():
        start = 0
        for _, parameter in trainable_parameters(model):
            part = flat[start:start + parameter.numel()].view_as(parameter)
            start += parameter.numel()
            if parameter.dtype == flat.dtype and parameter.device == flat.device:
                parameter.data = part
            else:
                parameter.copy_(part, non_blocking=True)


def flat_gradients(model: nn.Module, out: torch.Tensor | None = None) -> torch.Tensor:
    """The model's gradients as one flat float32 tensor; zeros where a trainable parameter has none.

    ``out``, a flat float32 tensor of the model's size on the gradients' device, receives them when
    they are float32 (reused every step, it saves a model-sized allocation); otherwise a new CPU
    tensor is returned. Gradients of other dtypes are cast to float32.
    """
    parts = [
        (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
        for _, p in trainable_parameters(model)
    ]
    if out is not None and all(part.device == out.device and part.dtype == torch.float32 for part in parts):
        return torch.cat(parts, out=out).detach()
    return torch.cat([part.to("cpu", torch.float32) for part in parts]).detach()
