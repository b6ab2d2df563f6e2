"""Tensor chunks written straight in protobuf's wire format, and read back without copies.

``PushFrame`` and ``PullFrame`` (proto/parameter_server.proto) are a oneof of ``header = 1``,
``chunk = 2`` and ``trailer = 3``, and a ``Chunk`` is ``index = 1`` (varint) and ``data = 2``
(bytes). Building a message object per chunk costs two extra copies of its megabyte of data
(into the message, then into the serialized string). :func:`chunk_frame` writes the same bytes
a protobuf library would (tag, varint length, raw data: one copy), and :func:`frame_parser`
reads a received frame into a :class:`ChunkView` whose ``data`` is a view of the received
bytes. Headers, trailers, and any frame the fast path does not recognise, go through the
generated protobuf classes, so a peer that builds ordinary messages interoperates in both
directions: the contract is the ``.proto``.

gRPC methods use these through custom (de)serializers: :data:`serialize_frame` on the sending
side (``bytes`` pass through, messages are serialized) and a :func:`frame_parser` on the
receiving side. ``WholePull``/``WholePush`` (a header and one chunk's bytes in one message) get
the same treatment from :func:`whole_message` and :func:`whole_parser`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import crc32c
from google.protobuf.message import Message

from gapaware.common.codec import EncodedTensor

_CHUNK_TAG = 0x12    # field 2, length-delimited (the frame's chunk, and the chunk's data)
_INDEX_TAG = 0x08    # field 1, varint
_HEADER_TAG = 0x0A   # field 1, length-delimited (a whole message's header)
_DATA_TAG = 0x12     # field 2, length-delimited (a whole message's data)
_TRAILER_TAG = 0x1A  # field 3, length-delimited (the frame's trailer)
_CRC_TAG = 0x0D      # field 1, fixed32 (the trailer's crc32c)


@dataclass(frozen=True, slots=True)
class ChunkView:
    """A received chunk: its index and a view of its bytes inside the received frame."""

    index: int
    data: memoryview


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def chunk_frame(index: int, data: memoryview) -> bytes:
    """The serialized ``PushFrame``/``PullFrame`` holding ``Chunk(index, data)``: one copy of ``data``.

    Byte for byte what protobuf writes (index 0, proto3's default, is left out as protobuf does).
    """
    chunk_prefix = (bytes((_INDEX_TAG,)) + _varint(index) if index else b"") + bytes((_CHUNK_TAG,)) + _varint(len(data))
    return b"".join((bytes((_CHUNK_TAG,)), _varint(len(chunk_prefix) + len(data)), chunk_prefix, data))


def chunk_frames(encoded: EncodedTensor,
                 frame: Callable[[int, int, int], bytes] | None = None) -> Iterator[bytes]:
    """The serialized chunk frames of ``encoded``, in order, then its trailer frame when its header
    announces one: the CRC-32C is computed chunk by chunk over each frame's copy of the bytes, while
    it is in cache.

    ``frame(index, start, stop)``, when given, frames chunk ``index`` (bytes ``start:stop`` of the
    tensor) in place of :func:`chunk_frame` on the encoded chunk: how the server reads a tensor it
    lent, which may be switched to a copy between two chunks (:class:`gapaware.server.sent.Loan`)."""
    crc = start = 0
    for index, data in enumerate(encoded.chunks):
        stop = start + len(data)
        framed = chunk_frame(index, data) if frame is None else frame(index, start, stop)
        yield framed
        if encoded.header.crc_in_trailer:
            crc = crc32c.crc32c(memoryview(framed)[len(framed) - len(data):], value=crc)
        start = stop
    if encoded.header.crc_in_trailer:
        yield trailer_frame(crc)


def trailer_frame(crc: int) -> bytes:
    """The serialized ``PushFrame``/``PullFrame`` holding ``TensorTrailer(crc32c=crc)``, byte for
    byte what protobuf writes (a CRC of 0, proto3's default, is left out)."""
    if crc == 0:
        return bytes((_TRAILER_TAG, 0))
    return bytes((_TRAILER_TAG, 5, _CRC_TAG)) + crc.to_bytes(4, "little")


def serialize_frame(frame: bytes | Message) -> bytes:
    """gRPC serializer for frames: chunks from :func:`chunk_frame` as they are, messages serialized."""
    return frame if isinstance(frame, bytes) else frame.SerializeToString()


def _read_varint(view: memoryview, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it; raises IndexError when truncated."""
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


def _fast_chunk(view: memoryview) -> ChunkView | None:
    """The chunk of a frame made of exactly one ``chunk`` field with only known fields, else None."""
    try:
        if view[0] != _CHUNK_TAG:
            return None
        length, pos = _read_varint(view, 1)
        if pos + length != len(view):
            return None
        index, data = 0, view[pos:pos]
        while pos < len(view):
            tag, pos = _read_varint(view, pos)
            if tag == _INDEX_TAG:
                index, pos = _read_varint(view, pos)
            elif tag == _CHUNK_TAG:
                size, pos = _read_varint(view, pos)
                if pos + size > len(view):
                    return None
                data, pos = view[pos:pos + size], pos + size
            else:
                return None
        return ChunkView(index, data)
    except IndexError:
        return None


def frame_parser(frame_type: type[Message]) -> Callable[[bytes], Message | ChunkView | None]:
    """gRPC deserializer for ``frame_type`` (``PushFrame`` or ``PullFrame``).

    Returns a :class:`ChunkView` for a chunk, the member's message for a header, a trailer or a
    ``PullFrame``'s ready, and None for a frame that holds none of them (the receiver refuses it).
    """

    def parse(raw: bytes) -> Message | ChunkView | None:
        fast = _fast_chunk(memoryview(raw))
        if fast is not None:
            return fast
        frame = frame_type.FromString(raw)
        kind = frame.WhichOneof("frame")
        if kind == "chunk":
            return ChunkView(frame.chunk.index, memoryview(frame.chunk.data))
        return getattr(frame, kind) if kind in ("header", "trailer", "ready") else None

    return parse


@dataclass(frozen=True, slots=True)
class WholeTensor:
    """A received ``WholePull``/``WholePush``: its header and a view of its data in the received bytes."""

    header: Message
    data: memoryview


def whole_message(header: Message, data: memoryview) -> bytes:
    """The serialized ``WholePull``/``WholePush`` of ``header`` and ``data``: one copy of ``data``,
    byte for byte what protobuf writes."""
    header_bytes = header.SerializeToString()
    parts = [bytes((_HEADER_TAG,)), _varint(len(header_bytes)), header_bytes]
    if len(data):
        parts += [bytes((_DATA_TAG,)), _varint(len(data)), data]
    return b"".join(parts)


def _fast_whole(view: memoryview, header_type: type[Message]) -> WholeTensor | None:
    """Header then data, each once, nothing else: the layout :func:`whole_message` writes."""
    try:
        if view[0] != _HEADER_TAG:
            return None
        length, pos = _read_varint(view, 1)
        header = header_type.FromString(view[pos:pos + length])
        pos += length
        if pos == len(view):
            return WholeTensor(header, view[pos:pos])
        if view[pos] != _DATA_TAG:
            return None
        size, pos = _read_varint(view, pos + 1)
        if pos + size != len(view):
            return None
        return WholeTensor(header, view[pos:])
    except IndexError:
        return None


def whole_parser(message_type: type[Message], header_type: type[Message]) -> Callable[[bytes], WholeTensor]:
    """gRPC deserializer for ``message_type`` (``WholePull`` with ``PullHeader``, or ``WholePush``
    with ``PushHeader``). Any layout the fast path does not recognise goes through protobuf, which
    raises ``DecodeError`` on bad bytes."""

    def parse(raw: bytes) -> WholeTensor:
        view = memoryview(raw)
        fast = _fast_whole(view, header_type)
        if fast is not None:
            return fast
        message = message_type.FromString(raw)
        return WholeTensor(message.header, memoryview(message.data))

    return parse
