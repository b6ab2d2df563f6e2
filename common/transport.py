"""Flat tensors to checked frames and back: the one tensor transport of server and worker.

A tensor travels as a :class:`~gapaware.proto.parameter_server_pb2.TensorHeader` (dtype, element
count, chunk count) and then chunks of raw little-endian bytes, at most :data:`MAX_CHUNK_BYTES`
and a whole number of elements each, every chunk with the CRC-32C of its own bytes. The receiver
checks each chunk as it arrives (:class:`Assembler`), so a corrupt byte is refused where it is,
before the tensor is complete. The transport dtype (float32, bfloat16, float16) is a choice made
here, not a branch in server or worker: :func:`encode` casts on the way out and the assembler
casts back to float32 on the way in.

The 8-bit dtypes (int8, float8) carry a :class:`~gapaware.common.codecs.Quantized` tensor, made by
the sender (with its error feedback, or as a delta: :mod:`gapaware.common.codecs`). Each chunk
holds whole blocks, the float32 scales of its blocks first and then a byte an element, so a chunk
is decoded, and checked by its CRC, on its own; the assembler decodes to float32, or adds what it
decodes to the tensor it receives into (``accumulate``, a delta pull).

One specialised path: chunk frames are written and read in protobuf's wire format by this module
(:func:`chunk_frame`, :func:`frame_parser`) rather than through message objects, which copy every
chunk's bytes twice more on the way out and once more on the way in; ``bench/transport.py``
measures what that is worth (docs/PERFORMANCE.md). Headers, and any frame the fast path does not
recognise, go through the generated classes, so a peer that builds ordinary messages
interoperates: the contract is the ``.proto``.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import crc32c
import torch
from google.protobuf.message import Message

from gapaware.common.codecs import BLOCK, CODECS as CODECS_BY_NAME, Codec, Quantized, add_dequantized_, decode_slice
from gapaware.proto import parameter_server_pb2 as pb

MAX_CHUNK_BYTES = 4 * 1024 * 1024
DEFAULT_CHUNK_BYTES = 1024 * 1024
MAX_MESSAGE_BYTES = MAX_CHUNK_BYTES + 1024
"""The largest message either side needs to accept: a chunk frame of the largest chunk, with room for its
framing (21 bytes); headers and the other requests are far smaller."""
MIN_CHUNK_BYTES = 4096
"""A server's floor on the chunk size a push may announce (all chunks but the last at least this big on
average), so that no push can hold its gradient buffer while trickling in a byte per chunk."""

DTYPES = {pb.FLOAT32: torch.float32, pb.BFLOAT16: torch.bfloat16, pb.FLOAT16: torch.float16}
DTYPE_NAMES = {"float32": pb.FLOAT32, "bfloat16": pb.BFLOAT16, "float16": pb.FLOAT16}
CODECS: dict[int, Codec] = {pb.INT8: CODECS_BY_NAME["int8"], pb.FLOAT8_E4M3FN: CODECS_BY_NAME["float8"]}
WIRE_DTYPE_NAMES = {**DTYPE_NAMES, **{codec.name: dtype for dtype, codec in CODECS.items()}}
"""Every dtype a tensor may travel in, by the name ``--push-dtype`` and ``--pull-dtype`` give it."""
CODEC_DTYPES = {codec: dtype for dtype, codec in CODECS.items()}

_FRAME_CHUNK_TAG = 0x12  # the frame's field 2 (chunk), length-delimited
_INDEX_TAG = 0x08        # Chunk.index, field 1, varint
_DATA_TAG = 0x12         # Chunk.data, field 2, length-delimited
_CRC_TAG = 0x1D          # Chunk.crc32c, field 3, fixed32


class TransportError(ValueError):
    """A tensor stream that does not match its header: the message says what is wrong."""


def dtype_from_name(name: str) -> int:
    try:
        return WIRE_DTYPE_NAMES[name]
    except KeyError:
        raise ValueError(f"Invalid transport dtype: {name!r} (choose from {', '.join(WIRE_DTYPE_NAMES)})") from None


def _known(dtype: int) -> None:
    if dtype not in DTYPES and dtype not in CODECS:
        raise TransportError(f"unknown tensor dtype {dtype} (expected one of {sorted({*DTYPES, *CODECS})})")


def itemsize(dtype: int) -> int:
    """Bytes an element of ``dtype`` (an 8-bit dtype's scales come on top: :func:`wire_bytes`)."""
    _known(dtype)
    return DTYPES[dtype].itemsize if dtype in DTYPES else CODECS[dtype].values.itemsize


def wire_format(dtype: int) -> torch.dtype | Codec:
    """What a known wire ``dtype`` is to the sender: a torch dtype to cast to, or a codec."""
    _known(dtype)
    return DTYPES.get(dtype) or CODECS[dtype]


def wire_dtype_of(tensor: torch.Tensor | Quantized) -> int:
    """The wire dtype a tensor travels in as it is: its own dtype, or its codec's."""
    if isinstance(tensor, Quantized):
        return CODEC_DTYPES[tensor.codec]
    return next(dtype for dtype, torch_dtype in DTYPES.items() if torch_dtype == tensor.dtype)


def wire_bytes(dtype: int, numel: int) -> int:
    """The bytes ``numel`` elements of ``dtype`` take in chunks, scales included."""
    _known(dtype)
    return numel * DTYPES[dtype].itemsize if dtype in DTYPES else CODECS[dtype].nbytes(numel)


@dataclass(frozen=True, slots=True)
class ChunkView:
    """A received chunk: its index, a view of its bytes inside the received frame, and its checksum."""

    index: int
    data: memoryview
    crc32c: int


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(tensor.view(torch.uint8).numpy())


def encode(tensor: torch.Tensor | Quantized, dtype: int = pb.FLOAT32, chunk_bytes: int = DEFAULT_CHUNK_BYTES, *,
           fill: Callable[[tuple[int, int]], object] | None = None) -> tuple[pb.TensorHeader, Iterator[bytes]]:
    """The header of a flat tensor in the transport ``dtype``, and its serialized chunk frames.

    The frames are made one at a time as they are taken, each read from ``tensor`` (or from its cast
    to ``dtype``, made here once) at that moment: the caller keeps ``tensor`` unchanged until the
    last frame is taken. ``chunk_bytes`` is rounded down to whole elements. A :class:`Quantized`
    tensor travels in the 8-bit ``dtype`` of its codec, in chunks of as many whole blocks as
    ``chunk_bytes`` holds (at least one); ``fill((first, end))``, when given, is called with a chunk's
    blocks before the chunk is framed, so a sender may quantize each chunk as it is sent.
    """
    if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
        raise ValueError(f"Invalid chunk size: {chunk_bytes} (1 to {MAX_CHUNK_BYTES} bytes)")
    if isinstance(tensor, Quantized):
        if dtype != CODEC_DTYPES[tensor.codec]:
            raise ValueError(f"a tensor quantized with {tensor.codec.name} travels as dtype "
                             f"{CODEC_DTYPES[tensor.codec]}, not {dtype}")
        return _encode_blocks(tensor, dtype, chunk_bytes, fill)
    if tensor.dim() != 1:
        raise ValueError(f"expected a flat tensor, got shape {tuple(tensor.shape)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype} needs a Quantized tensor (gapaware.common.codecs), not a {tensor.dtype} one")
    size = itemsize(dtype)
    chunk_bytes = max(size, chunk_bytes // size * size)
    flat = tensor.detach().to("cpu", DTYPES[dtype]).contiguous()
    raw = tensor_bytes(flat)
    header = pb.TensorHeader(dtype=dtype, numel=flat.numel(), chunk_count=math.ceil(len(raw) / chunk_bytes))

    def frames() -> Iterator[bytes]:
        for index, start in enumerate(range(0, len(raw), chunk_bytes)):
            yield chunk_frame(index, raw[start:start + chunk_bytes])

    return header, frames()


def _block_bytes(codec: Codec) -> int:
    """Bytes of a whole block in a chunk: its scale and its elements."""
    return 4 + BLOCK * codec.values.itemsize


def _encode_blocks(quantized: Quantized, dtype: int, chunk_bytes: int,
                   fill: Callable[[tuple[int, int]], object] | None) -> tuple[pb.TensorHeader, Iterator[bytes]]:
    blocks = max(1, chunk_bytes // _block_bytes(quantized.codec))
    scales, values = tensor_bytes(quantized.scales), tensor_bytes(quantized.values)
    size = quantized.codec.values.itemsize
    header = pb.TensorHeader(dtype=dtype, numel=quantized.numel,
                             chunk_count=math.ceil(quantized.scales.numel() / blocks))

    def frames() -> Iterator[bytes]:
        for index, first in enumerate(range(0, quantized.scales.numel(), blocks)):
            last = min(first + blocks, quantized.scales.numel())
            if fill is not None:
                fill((first, last))
            yield chunk_frame(index, scales[4 * first:4 * last], values[first * BLOCK * size:last * BLOCK * size])

    return header, frames()


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def chunk_frame(index: int, *data: memoryview) -> bytes:
    """The serialized ``PushFrame``/``PullFrame`` holding ``Chunk(index, data, crc32c(data))``, byte for
    byte what protobuf writes (fields at proto3's default, 0, are left out), with one copy of ``data``
    (given in parts, which the chunk holds one after the other)."""
    crc = 0
    for part in data:
        crc = crc32c.crc32c(part, crc)
    length = sum(len(part) for part in data)
    index_field = bytes((_INDEX_TAG,)) + _varint(index) if index else b""
    crc_field = bytes((_CRC_TAG,)) + crc.to_bytes(4, "little") if crc else b""
    data_prefix = bytes((_DATA_TAG,)) + _varint(length)
    chunk_length = len(index_field) + len(data_prefix) + length + len(crc_field)
    return b"".join((bytes((_FRAME_CHUNK_TAG,)), _varint(chunk_length), index_field, data_prefix, *data, crc_field))


def serialize_frame(frame: bytes | Message) -> bytes:
    """gRPC serializer for frames: chunks from :func:`chunk_frame` as they are, messages serialized."""
    return frame if isinstance(frame, bytes) else frame.SerializeToString()


def _read_varint(view: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = view[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise IndexError("varint too long")


def _chunk_in_place(view: memoryview) -> ChunkView | None:
    """The chunk of a frame that is one chunk field of known fields, read in place; else None."""
    try:
        if view[0] != _FRAME_CHUNK_TAG:
            return None
        length, pos = _read_varint(view, 1)
        if pos + length != len(view):
            return None
        index, crc, data = 0, 0, view[pos:pos]
        while pos < len(view):
            tag, pos = _read_varint(view, pos)
            if tag == _INDEX_TAG:
                index, pos = _read_varint(view, pos)
            elif tag == _DATA_TAG:
                size, pos = _read_varint(view, pos)
                if pos + size > len(view):
                    return None
                data, pos = view[pos:pos + size], pos + size
            elif tag == _CRC_TAG and pos + 4 <= len(view):
                crc, pos = int.from_bytes(view[pos:pos + 4], "little"), pos + 4
            else:
                return None
        return ChunkView(index, data, crc)
    except IndexError:
        return None


def frame_parser(frame_type: type[Message]) -> Callable[[bytes], Message | ChunkView | None]:
    """gRPC deserializer for ``frame_type`` (``PushFrame`` or ``PullFrame``): a :class:`ChunkView` for
    a chunk, the member's message for a header or a ready frame, None for a frame holding nothing."""

    def parse(raw: bytes) -> Message | ChunkView | None:
        in_place = _chunk_in_place(memoryview(raw))
        if in_place is not None:
            return in_place
        frame = frame_type.FromString(raw)
        kind = frame.WhichOneof("frame")
        if kind == "chunk":
            return ChunkView(frame.chunk.index, memoryview(frame.chunk.data), frame.chunk.crc32c)
        return None if kind is None else getattr(frame, kind)

    return parse


def check_header(header: pb.TensorHeader, *, numel: int, min_chunk_bytes: int = 1) -> int:
    """The byte count of the tensor ``header`` announces, once it is checked against what the receiver
    needs: ``numel`` elements of a known dtype in chunks of at most :data:`MAX_CHUNK_BYTES` and, but
    for the last, at least ``min_chunk_bytes`` on average (a whole element at the least; for an 8-bit
    dtype, a whole block)."""
    _known(header.dtype)
    if header.numel != numel:
        raise TransportError(f"tensor has {header.numel} elements but {numel} are expected")
    nbytes = wire_bytes(header.dtype, numel)
    codec = CODECS.get(header.dtype)
    if codec is None:
        smallest, units = DTYPES[header.dtype].itemsize, numel
        fewest = -(-nbytes // MAX_CHUNK_BYTES)
    else:
        smallest, units = _block_bytes(codec), codec.blocks(numel)
        fewest = -(-units // (MAX_CHUNK_BYTES // smallest))
    smallest = max(min_chunk_bytes, smallest)
    most = min(units, -(-nbytes // smallest))
    if not fewest <= header.chunk_count <= most:
        raise TransportError(f"header announces {header.chunk_count} chunks for {nbytes} bytes (between {fewest} "
                             f"and {most} needed with chunks of {smallest} to {MAX_CHUNK_BYTES} bytes"
                             + (")" if codec is None else ", of whole blocks)"))
    return nbytes


class Assembler:
    """Receives the chunks that follow a header into a float32 tensor, checking each as it arrives.

    ``numel`` is the element count the receiver needs (the model's size): a header claiming any other
    count is refused before a byte is allocated, so a lying header cannot make the receiver reserve
    memory; ``min_chunk_bytes`` bounds the chunk count it may announce (:func:`check_header`). The
    tensor is written into ``out`` (a flat contiguous float32 CPU tensor of ``numel``
    elements, which a receiver may reuse across transfers) or a new one; with ``accumulate`` (a delta
    pull, 8-bit dtypes only) what arrives is added to ``out`` instead. With ``check_finite`` each
    chunk is checked for NaN and Inf while it is in cache (:attr:`finite`). A stream refused half-way
    leaves ``out`` partly overwritten.
    """

    def __init__(self, header: pb.TensorHeader, *, numel: int, out: torch.Tensor | None = None,
                 check_finite: bool = False, min_chunk_bytes: int = 1, accumulate: bool = False) -> None:
        self._nbytes = check_header(header, numel=numel, min_chunk_bytes=min_chunk_bytes)
        self._dtype = DTYPES.get(header.dtype)
        self._codec = CODECS.get(header.dtype)
        if accumulate and self._codec is None:
            raise TransportError(f"a delta must come in an 8-bit dtype, not in dtype {header.dtype}")
        if accumulate and out is None:
            raise ValueError("a delta is added to the tensor it updates: give it as out")
        if out is None:
            out = torch.empty(numel)
        elif out.shape != (numel,) or out.dtype != torch.float32 or out.device.type != "cpu" \
                or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous flat float32 CPU tensor of {numel} elements, "
                             f"got {out.dtype} of shape {tuple(out.shape)} on {out.device}")
        self._chunk_count = header.chunk_count
        self._out = out
        self._out_bytes = tensor_bytes(out)
        self._check_finite = check_finite
        self._accumulate = accumulate
        self._scratch: torch.Tensor | None = None
        self.finite = True
        self._elements = 0
        self._received = 0
        self._next_index = 0

    def add(self, frame: object) -> None:
        """Takes the next frame of the stream, which must be its next chunk."""
        if not isinstance(frame, ChunkView):
            what = "a header" if isinstance(frame, (pb.PushHeader, pb.PullHeader)) else "a frame with no chunk"
            raise TransportError(f"{what} arrived among the chunks")
        if frame.index != self._next_index:
            raise TransportError(f"chunk {frame.index} arrived where chunk {self._next_index} was expected")
        if self._next_index >= self._chunk_count:
            raise TransportError(f"more chunks than the {self._chunk_count} the header announced")
        length = len(frame.data)
        elements, blocks = self._chunk_layout(frame.index, length)
        if crc32c.crc32c(frame.data) != frame.crc32c:
            raise TransportError(f"checksum mismatch in chunk {frame.index}: its bytes are not those that were sent")
        target = self._out[self._elements:self._elements + elements]
        if self._codec is not None:
            scales = _read_only_tensor(frame.data[:4 * blocks], torch.float32)
            values = _read_only_tensor(frame.data[4 * blocks:], self._codec.values)
            if self._accumulate:
                add_dequantized_(self._codec, target, values, scales, self._scratch_of(elements))
            else:
                decode_slice(self._codec, values, scales, target)
        elif self._dtype == torch.float32:  # a plain memcpy: torch's copy_ may hand 1 MiB to its thread pool
            start = self._elements * 4
            self._out_bytes[start:start + length] = frame.data
        else:
            target.copy_(_read_only_tensor(frame.data, self._dtype))
        if self._check_finite and self.finite:
            self.finite = all_finite(target)
        self._elements += elements
        self._received += length
        self._next_index += 1

    def _chunk_layout(self, index: int, length: int) -> tuple[int, int]:
        """The elements (and, for an 8-bit dtype, blocks) a chunk of ``length`` bytes holds here."""
        remaining = self._out.numel() - self._elements
        if self._codec is None:
            size = self._dtype.itemsize
            if not 0 < length <= MAX_CHUNK_BYTES or length % size:
                raise TransportError(f"chunk {index} has {length} bytes (1 to {MAX_CHUNK_BYTES} allowed, whole "
                                     f"elements of {size} bytes)")
            if length // size > remaining:
                raise TransportError(f"chunks carry more than the {self._nbytes} bytes the header announced")
            return length // size, 0
        if not 0 < length <= MAX_CHUNK_BYTES:
            raise TransportError(f"chunk {index} has {length} bytes (1 to {MAX_CHUNK_BYTES} allowed)")
        blocks, rest = divmod(length, _block_bytes(self._codec))
        if not rest and 0 < blocks * BLOCK <= remaining:
            return blocks * BLOCK, blocks
        blocks = self._codec.blocks(remaining)
        if length == self._codec.nbytes(remaining):  # the tensor's last chunk, ending in a shorter block
            return remaining, blocks
        raise TransportError(f"chunk {index} has {length} bytes: not whole blocks of {_block_bytes(self._codec)} "
                             f"bytes (a scale and {BLOCK} elements), nor the last {self._codec.nbytes(remaining)} "
                             f"bytes of the tensor ({remaining} elements)")

    def _scratch_of(self, elements: int) -> torch.Tensor:
        if self._scratch is None or self._scratch.numel() < elements:
            self._scratch = torch.empty(elements)
        return self._scratch[:elements]

    def finish(self) -> torch.Tensor:
        """The received tensor (float32), once every chunk has arrived."""
        if self._next_index != self._chunk_count or self._elements != self._out.numel():
            raise TransportError(f"stream ended after {self._next_index} of {self._chunk_count} chunks "
                                 f"({self._received} of {self._nbytes} bytes)")
        return self._out


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no element is NaN or ±Inf.

    A NaN or an infinity makes the sum NaN or infinite, so a finite sum proves every element finite
    in one streaming pass with no temporary; only a non-finite sum (a bad tensor, or finite elements
    whose float32 sum overflows) pays for the exact element-wise test, which allocates.
    """
    return math.isfinite(tensor.sum().item()) or bool(torch.isfinite(tensor).all())


def _read_only_tensor(data: memoryview, dtype: torch.dtype) -> torch.Tensor:
    """A tensor over ``data`` (received bytes, which are immutable), without a copy."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # that the bytes are not writable: the tensor is only read
        return torch.frombuffer(data, dtype=dtype)
