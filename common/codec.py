"""Flat tensors to checked chunk streams and back.

A tensor travels as a :class:`~gapaware.proto.parameter_server_pb2.TensorHeader`
(dtype, element count, chunk count, CRC-32C of the payload) and then chunks of raw
little-endian bytes of at most :data:`MAX_CHUNK_BYTES`. A stream may send the CRC-32C in a
:class:`~gapaware.proto.parameter_server_pb2.TensorTrailer` after its last chunk instead
(``crc_in_trailer``): its sender then checksums each chunk as it goes out rather than
reading the whole tensor before the header can leave. The transport dtype
(float32, bfloat16, float16) is a choice made here, not a branch in server or
worker: :func:`encode` casts on the way out and :class:`TensorAssembler` casts
back to float32 on the way in, after checking everything the header claims.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import crc32c
import torch

from gapaware.proto import parameter_server_pb2 as pb

MAX_CHUNK_BYTES = 4 * 1024 * 1024
DEFAULT_CHUNK_BYTES = 1024 * 1024

TORCH_DTYPES = {pb.FLOAT32: torch.float32, pb.BFLOAT16: torch.bfloat16, pb.FLOAT16: torch.float16}
DTYPE_NAMES = {"float32": pb.FLOAT32, "bfloat16": pb.BFLOAT16, "float16": pb.FLOAT16}


class CodecError(ValueError):
    """A tensor stream that does not match its header: the message says what is wrong."""


def dtype_from_name(name: str) -> int:
    try:
        return DTYPE_NAMES[name]
    except KeyError:
        raise ValueError(f"Invalid transport dtype: {name!r} (choose from {', '.join(DTYPE_NAMES)})") from None


def itemsize(dtype: int) -> int:
    if dtype not in TORCH_DTYPES:
        raise CodecError(f"unknown tensor dtype {dtype} (expected one of {sorted(TORCH_DTYPES)})")
    return TORCH_DTYPES[dtype].itemsize


@dataclass(frozen=True)
class EncodedTensor:
    header: pb.TensorHeader
    chunks: list[memoryview]


def encode(tensor: torch.Tensor, dtype: int = pb.FLOAT32, chunk_bytes: int = DEFAULT_CHUNK_BYTES, *,
           cast_into: torch.Tensor | None = None, crc_in_trailer: bool = False) -> EncodedTensor:
    """Splits a flat tensor into chunks of ``chunk_bytes`` in the transport ``dtype``.

    The chunks are views of one contiguous CPU buffer: ``tensor`` itself when it already is one
    in ``dtype``, else a cast or device copy, written into ``cast_into`` when given (a contiguous
    CPU tensor of ``dtype`` and ``tensor``'s size, reused by the caller: a fresh one costs page
    faults on every transfer), else into a new tensor. The chunks read that buffer until sent.
    The header holds the payload's CRC-32C, or with ``crc_in_trailer`` says that a trailer will
    (:func:`gapaware.common.wire.chunk_frames` computes it while it frames the chunks).
    """
    if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
        raise ValueError(f"Invalid chunk size: {chunk_bytes} (1 to {MAX_CHUNK_BYTES} bytes)")
    if tensor.dim() != 1:
        raise ValueError(f"expected a flat tensor, got shape {tuple(tensor.shape)}")
    itemsize(dtype)
    flat = tensor.detach()
    if flat.device.type != "cpu" or flat.dtype != TORCH_DTYPES[dtype] or not flat.is_contiguous():
        if cast_into is None:
            flat = flat.to("cpu", TORCH_DTYPES[dtype]).contiguous()
        elif not _fits(cast_into, TORCH_DTYPES[dtype], flat.numel()):
            raise ValueError(f"cast_into must be a contiguous CPU tensor of {TORCH_DTYPES[dtype]} and shape "
                             f"{tuple(flat.shape)}, got {cast_into.dtype} of shape {tuple(cast_into.shape)}")
        else:
            flat = cast_into.copy_(flat)
    raw = tensor_bytes(flat)
    chunks = [raw[start:start + chunk_bytes] for start in range(0, len(raw), chunk_bytes)]
    header = pb.TensorHeader(dtype=dtype, numel=flat.numel(), chunk_count=len(chunks), crc_in_trailer=crc_in_trailer,
                             crc32c=0 if crc_in_trailer else crc32c.crc32c(raw))
    return EncodedTensor(header, chunks)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(tensor.view(torch.uint8).numpy())


def encode_to_send(tensor: torch.Tensor, dtype: int, *, whole: bool, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                   cast_into: torch.Tensor | None = None) -> EncodedTensor:
    """:func:`encode` as gapaware's server and worker send a tensor. A ``whole`` message is one chunk
    (at most :data:`MAX_CHUNK_BYTES`) with the CRC-32C in its header. A stream is cut into
    ``chunk_bytes`` chunks and sends its CRC-32C last, in its trailer, so that its header leaves
    before a pass over the tensor."""
    if whole:
        return encode(tensor, dtype, MAX_CHUNK_BYTES, cast_into=cast_into)
    return encode(tensor, dtype, chunk_bytes, cast_into=cast_into, crc_in_trailer=True)


def _fits(buffer: torch.Tensor, dtype: torch.dtype, numel: int) -> bool:
    """Whether a caller's ``buffer`` can hold ``numel`` elements of ``dtype`` as the codec writes them:
    a flat contiguous CPU tensor of exactly that size and dtype."""
    return buffer.shape == (numel,) and buffer.dtype == dtype and buffer.device.type == "cpu" \
        and buffer.is_contiguous()


def chunk_messages(encoded: EncodedTensor) -> Iterator[pb.Chunk]:
    for index, data in enumerate(encoded.chunks):
        yield pb.Chunk(index=index, data=bytes(data))


class TensorAssembler:
    """Receives the chunks that follow a header (and the trailer, when the header announces one)
    and checks all of it.

    ``expected_numel`` is the element count the receiver needs (the model's size);
    a header claiming any other count is refused before a byte is allocated, so a
    lying header cannot make the receiver reserve memory.

    The tensor is written into ``out``, a flat float32 tensor of ``expected_numel`` elements,
    as the chunks arrive (reduced-precision chunks are cast on the way); None allocates it.
    Receivers that keep one ``out`` across transfers skip a model-sized allocation each time:
    the kernel zeroes every fresh page, and on a 100 MiB tensor that zeroing cost more CPU than
    the transfer (on this project's 2-core machines, 40% of a worker's time on 100 MiB pulls).
    A stream refused half-way leaves ``out`` partly overwritten.

    With ``borrow``, a float32 tensor that arrives in one chunk is not copied: :meth:`finish`
    returns a tensor that reads the chunk's bytes where they arrived (``out`` is left untouched).
    It must only be read, and it keeps the received message alive. The server borrows a
    gradient that arrived in one message, which the update only reads: a copy less per push.
    """

    def __init__(self, header: pb.TensorHeader, *, expected_numel: int, out: torch.Tensor | None = None,
                 borrow: bool = False) -> None:
        size = itemsize(header.dtype)
        if header.numel != expected_numel:
            raise CodecError(f"tensor has {header.numel} elements but {expected_numel} are expected")
        self._nbytes = header.numel * size
        min_chunks = -(-self._nbytes // MAX_CHUNK_BYTES)
        if not min_chunks <= header.chunk_count <= self._nbytes:
            raise CodecError(
                f"header announces {header.chunk_count} chunks for {self._nbytes} bytes "
                f"(between {min_chunks} and {self._nbytes} needed with chunks of at most {MAX_CHUNK_BYTES} bytes)"
            )
        if out is None:
            out = torch.empty(expected_numel)
        elif not _fits(out, torch.float32, expected_numel):
            raise ValueError(f"out must be a contiguous flat float32 CPU tensor of {expected_numel} elements, "
                             f"got {out.dtype} of shape {tuple(out.shape)} on {out.device}")
        self._header = header
        self._out = out
        self._borrow = borrow and header.dtype == pb.FLOAT32 and header.chunk_count == 1
        self._cast = _ChunkCaster(TORCH_DTYPES[header.dtype], out) if header.dtype != pb.FLOAT32 else None
        self._view = memoryview(out.view(torch.uint8).numpy())
        self._offset = 0
        self._next_index = 0
        self._crc = 0
        self._trailer: pb.TensorTrailer | None = None

    def add(self, chunk: pb.Chunk) -> None:
        if self._trailer is not None:
            raise CodecError(f"chunk {chunk.index} arrived after the trailer, which ends the stream")
        if chunk.index != self._next_index:
            raise CodecError(f"chunk {chunk.index} arrived where chunk {self._next_index} was expected")
        if self._next_index >= self._header.chunk_count:
            raise CodecError(f"more chunks than the {self._header.chunk_count} the header announced")
        length = len(chunk.data)
        if not 0 < length <= MAX_CHUNK_BYTES:
            raise CodecError(f"chunk {chunk.index} has {length} bytes (1 to {MAX_CHUNK_BYTES} allowed)")
        if self._offset + length > self._nbytes:
            raise CodecError(f"chunks carry more than the {self._nbytes} bytes the header announced")
        if self._borrow and length == self._nbytes:
            self._out = _read_only_tensor(chunk.data)
        elif self._cast is None:
            self._view[self._offset:self._offset + length] = chunk.data
        else:
            self._cast.add(chunk.data)
        self._crc = crc32c.crc32c(chunk.data, value=self._crc)
        self._offset += length
        self._next_index += 1

    def add_trailer(self, trailer: pb.TensorTrailer) -> None:
        """The frame after the last chunk of a stream whose header set ``crc_in_trailer``."""
        if not self._header.crc_in_trailer:
            raise CodecError("a trailer arrived but the header carries the checksum and announced none")
        if self._trailer is not None:
            raise CodecError("a second trailer arrived")
        self._trailer = trailer

    @property
    def tensor(self) -> torch.Tensor:
        """The float32 tensor the chunks arrive in: ``out``, or the borrowed chunk once it arrived."""
        return self._out

    @property
    def elements(self) -> int:
        """Elements of :attr:`tensor` received so far (a chunk may end inside an element)."""
        return self._cast.elements if self._cast is not None else self._offset // 4

    def finish(self) -> torch.Tensor:
        """The received tensor as float32 (``out``), once every chunk arrived and the checksum matches."""
        if self._next_index != self._header.chunk_count or self._offset != self._nbytes:
            raise CodecError(
                f"stream ended after {self._next_index} of {self._header.chunk_count} chunks "
                f"({self._offset} of {self._nbytes} bytes)"
            )
        if self._header.crc_in_trailer and self._trailer is None:
            raise CodecError("stream ended without the trailer its header announced")
        expected, where = (self._trailer.crc32c, "trailer") if self._trailer is not None else \
            (self._header.crc32c, "header")
        if self._crc != expected:
            raise CodecError(f"checksum mismatch: payload CRC-32C {self._crc:#010x}, {where} says {expected:#010x}")
        return self._out


def _read_only_tensor(data: memoryview, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A tensor over ``data`` (received bytes, which are immutable), without a copy."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # that the bytes are not writable: the tensor is only read
        return torch.frombuffer(data, dtype=dtype)


class _ChunkCaster:
    """Casts reduced-precision bytes into float32 ``out`` chunk by chunk. A chunk of whole elements
    (what gapaware sends) is cast from where it arrived. A chunk may also end inside an element
    (the protocol does not align chunks to elements): then its bytes go through a staging buffer,
    where the unfinished element's first bytes wait for the next chunk."""

    def __init__(self, dtype: torch.dtype, out: torch.Tensor) -> None:
        self._dtype = dtype
        self._out = out
        self._stage: torch.Tensor | None = None  # allocated by the first chunk that needs it
        self._carried = 0      # bytes of an unfinished element at the start of the stage
        self.elements = 0      # elements of out written so far

    def add(self, data: memoryview) -> None:
        if self._carried == 0 and len(data) % self._dtype.itemsize == 0:
            self._cast(_read_only_tensor(data, self._dtype))
            return
        if self._stage is None:
            self._stage = torch.empty(MAX_CHUNK_BYTES + self._dtype.itemsize, dtype=torch.uint8)
        stage = memoryview(self._stage.numpy())
        end = self._carried + len(data)
        stage[self._carried:end] = data
        whole = end // self._dtype.itemsize * self._dtype.itemsize
        self._cast(self._stage[:whole].view(self._dtype))
        self._carried = end - whole
        stage[:self._carried] = stage[whole:end]

    def _cast(self, values: torch.Tensor) -> None:
        self._out[self.elements:self.elements + values.numel()].copy_(values)
        self.elements += values.numel()
