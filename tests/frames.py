"""Push streams as ordinary protobuf messages, for tests that craft what a worker sends."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from gapaware.common.transport import DEFAULT_CHUNK_BYTES, encode
from gapaware.proto import parameter_server_pb2 as pb


@dataclass(frozen=True)
class EncodedMessages:
    header: pb.TensorHeader
    chunks: list[pb.Chunk]


def encode_messages(tensor: torch.Tensor, dtype: int = pb.FLOAT32,
                    chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> EncodedMessages:
    """What :func:`gapaware.common.transport.encode` sends, parsed back into ``Chunk`` messages."""
    header, frames = encode(tensor, dtype, chunk_bytes)
    return EncodedMessages(header, [pb.PushFrame.FromString(frame).chunk for frame in frames])


def push_stream(worker_id: int, base_version: int, grad: torch.Tensor, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                **header) -> list[pb.PushFrame]:
    """A valid push stream; ``header`` overrides PushHeader fields, ``tensor`` TensorHeader fields."""
    encoded = encode_messages(grad, chunk_bytes=chunk_bytes)
    tensor = pb.TensorHeader()
    tensor.CopyFrom(encoded.header)
    for name, value in header.pop("tensor", {}).items():
        setattr(tensor, name, value)
    fields = {"worker_id": worker_id, "base_version": base_version, "seq": 0, "samples": 32, "loss": 1.0, **header}
    return [pb.PushFrame(header=pb.PushHeader(tensor=tensor, **fields)),
            *(pb.PushFrame(chunk=chunk) for chunk in encoded.chunks)]
