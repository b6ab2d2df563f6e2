"""The codec: exact round trips, and every malformed stream refused with a clear reason."""
import crc32c
import numpy
import pytest
import torch

from gapaware.common import codec
from gapaware.common.codec import CodecError, TensorAssembler, chunk_messages, encode
from gapaware.common.wire import ChunkView
from gapaware.proto import parameter_server_pb2 as pb

ELEMS_PER_CHUNK = codec.DEFAULT_CHUNK_BYTES // 4


def roundtrip(tensor, dtype=pb.FLOAT32, chunk_bytes=codec.DEFAULT_CHUNK_BYTES):
    encoded = encode(tensor, dtype, chunk_bytes)
    assembler = TensorAssembler(encoded.header, expected_numel=tensor.numel())
    for chunk in chunk_messages(encoded):
        assembler.add(chunk)
    return encoded, assembler.finish()


@pytest.mark.parametrize("numel", [0, 1, ELEMS_PER_CHUNK - 1, ELEMS_PER_CHUNK, ELEMS_PER_CHUNK + 1])
def test_float32_roundtrip_is_bit_exact(numel):
    tensor = torch.randn(numel)
    encoded, back = roundtrip(tensor)
    assert back.dtype == torch.float32
    assert torch.equal(back, tensor)
    assert encoded.header.chunk_count == -(-numel * 4 // codec.DEFAULT_CHUNK_BYTES)


def test_thirty_million_elements_roundtrip_in_max_size_chunks():
    tensor = torch.arange(30_000_000, dtype=torch.float32)
    encoded, back = roundtrip(tensor, chunk_bytes=codec.MAX_CHUNK_BYTES)
    assert encoded.header.numel == 30_000_000
    assert encoded.header.chunk_count == -(-120_000_000 // codec.MAX_CHUNK_BYTES)
    assert all(len(c) <= codec.MAX_CHUNK_BYTES for c in encoded.chunks)
    assert torch.equal(back, tensor)


@pytest.mark.parametrize("dtype,torch_dtype", [(pb.BFLOAT16, torch.bfloat16), (pb.FLOAT16, torch.float16)])
def test_half_precision_transport_halves_bytes_and_rounds_like_torch(dtype, torch_dtype):
    tensor = torch.randn(ELEMS_PER_CHUNK + 3)
    encoded, back = roundtrip(tensor, dtype)
    assert sum(len(c) for c in encoded.chunks) == tensor.numel() * 2
    assert torch.equal(back, tensor.to(torch_dtype).to(torch.float32))


@pytest.mark.parametrize("dtype,torch_dtype", [(pb.BFLOAT16, torch.bfloat16), (pb.FLOAT16, torch.float16)])
@pytest.mark.parametrize("chunk_bytes", [1, 3, 7, 4096])
def test_half_precision_chunks_may_split_an_element(dtype, torch_dtype, chunk_bytes):
    """Chunk boundaries are not aligned to elements: odd-sized chunks end inside a 2-byte element."""
    tensor = torch.randn(1001)
    _, back = roundtrip(tensor, dtype, chunk_bytes)
    assert torch.equal(back, tensor.to(torch_dtype).to(torch.float32))


@pytest.mark.parametrize("sizes", [[8, 3, 5, 6], [1, 1, 2, 4], [2, 7, 1, 8]])
def test_half_precision_chunks_of_whole_and_split_elements_mixed(sizes):
    """Chunks of whole elements are cast where they arrive, the others through the staging buffer;
    any order of the two gives the same tensor."""
    tensor = torch.randn(1000)
    encoded = encode(tensor, pb.BFLOAT16, codec.MAX_CHUNK_BYTES)
    payload = bytes(encoded.chunks[0])
    cuts = [0]
    for size in sizes:
        cuts.append(cuts[-1] + size)
    cuts.append(len(payload))
    header = pb.TensorHeader()
    header.CopyFrom(encoded.header)
    header.chunk_count = len(cuts) - 1
    back = feed(header, [pb.Chunk(index=i, data=payload[a:b]) for i, (a, b) in enumerate(zip(cuts, cuts[1:]))], 1000)
    assert torch.equal(back, tensor.to(torch.bfloat16).to(torch.float32))


@pytest.mark.parametrize("dtype", [pb.FLOAT32, pb.BFLOAT16])
def test_assembler_writes_into_the_given_tensor_every_time(dtype):
    out = torch.full((5000,), float("nan"))
    for seed in range(3):
        tensor = torch.randn(5000, generator=torch.Generator().manual_seed(seed))
        encoded = encode(tensor, dtype, 4096)
        assembler = TensorAssembler(encoded.header, expected_numel=5000, out=out)
        for chunk in chunk_messages(encoded):
            assembler.add(chunk)
        back = assembler.finish()
        assert back is out
        assert torch.equal(out, tensor.to(codec.TORCH_DTYPES[dtype]).to(torch.float32))


@pytest.mark.parametrize("offset", [0, 1, 3])
def test_a_borrowed_float32_tensor_in_one_chunk_reads_the_received_bytes_without_a_copy(offset):
    """``offset``: where the data starts in the message, after a header of any length."""
    tensor = torch.randn(5000)
    header, (chunk,) = frames(tensor, chunk_bytes=codec.MAX_CHUNK_BYTES)
    received = bytes(offset) + bytes(chunk.data)  # immutable, as gRPC delivers a message
    out = torch.full((5000,), float("nan"))
    assembler = TensorAssembler(header, expected_numel=5000, out=out, borrow=True)
    assembler.add(ChunkView(0, memoryview(received)[offset:]))  # as the servicer passes a whole message's data
    back = assembler.finish()
    assert torch.equal(back, tensor) and torch.isnan(out).all(), "out is left untouched"
    assert back.data_ptr() == numpy.frombuffer(received, numpy.uint8).ctypes.data + offset, "the tensor reads the message"

    corrupt = bytearray(received)
    corrupt[offset + 5] ^= 1
    assembler = TensorAssembler(header, expected_numel=5000, out=out, borrow=True)
    assembler.add(ChunkView(0, memoryview(bytes(corrupt))[offset:]))
    with pytest.raises(CodecError, match="checksum mismatch"):
        assembler.finish()


@pytest.mark.parametrize("dtype, chunk_bytes", [(pb.FLOAT32, 4096), (pb.BFLOAT16, codec.MAX_CHUNK_BYTES)])
def test_borrowing_copies_into_out_what_arrives_in_several_chunks_or_another_dtype(dtype, chunk_bytes):
    tensor = torch.randn(5000)
    header, chunks = frames(tensor, dtype, chunk_bytes)
    out = torch.empty(5000)
    assembler = TensorAssembler(header, expected_numel=5000, out=out, borrow=True)
    for chunk in chunks:
        assembler.add(chunk)
    assert assembler.finish() is out
    assert torch.equal(out, tensor.to(codec.TORCH_DTYPES[dtype]).to(torch.float32))


@pytest.mark.parametrize("out", [torch.empty(4999), torch.empty(5000, dtype=torch.float64), torch.empty(10000)[::2],
                                 torch.empty(50, 100)])
def test_assembler_refuses_an_unfit_out_tensor(out):
    header, _ = frames(torch.randn(5000))
    with pytest.raises(ValueError, match="out must be a contiguous flat float32 CPU tensor of 5000 elements"):
        TensorAssembler(header, expected_numel=5000, out=out)


def frames(tensor, dtype=pb.FLOAT32, chunk_bytes=4096):
    encoded = encode(tensor, dtype, chunk_bytes)
    return encoded.header, list(chunk_messages(encoded))


def feed(header, chunks, expected_numel):
    assembler = TensorAssembler(header, expected_numel=expected_numel)
    for chunk in chunks:
        assembler.add(chunk)
    return assembler.finish()


def test_corrupted_chunk_is_rejected_by_checksum():
    header, chunks = frames(torch.randn(5000))
    data = bytearray(chunks[2].data)
    data[17] ^= 0x01
    chunks[2] = pb.Chunk(index=2, data=bytes(data))
    with pytest.raises(CodecError, match="checksum mismatch"):
        feed(header, chunks, 5000)


def test_wrong_element_count_is_rejected_before_allocating():
    header, chunks = frames(torch.randn(5000))
    header.numel = 10**12
    with pytest.raises(CodecError, match="1000000000000 elements but 5000 are expected"):
        feed(header, chunks, 5000)


def test_header_lying_about_chunk_count_is_rejected():
    header, chunks = frames(torch.randn(5000))
    header.chunk_count += 1
    with pytest.raises(CodecError, match="stream ended after"):
        feed(header, chunks, 5000)


def test_wrong_dtype_is_rejected():
    header, chunks = frames(torch.randn(5000))
    header.dtype = pb.BFLOAT16  # payload is float32: twice the bytes the header implies
    with pytest.raises(CodecError, match="more than the 10000 bytes"):
        feed(header, chunks, 5000)
    header.dtype = 42
    with pytest.raises(CodecError, match="unknown tensor dtype 42"):
        feed(header, chunks, 5000)


def test_chunks_out_of_order_missing_or_extra_are_rejected():
    header, chunks = frames(torch.randn(5000))
    with pytest.raises(CodecError, match="chunk 1 arrived where chunk 0 was expected"):
        feed(header, [chunks[1], chunks[0], *chunks[2:]], 5000)
    with pytest.raises(CodecError, match="chunk 3 arrived where chunk 2 was expected"):
        feed(header, [chunks[0], chunks[1], *chunks[3:]], 5000)
    with pytest.raises(CodecError, match="more chunks than"):
        feed(header, [*chunks, pb.Chunk(index=len(chunks), data=b"\0\0\0\0")], 5000)


def trailed(tensor):
    """The header, chunks and trailer of a stream that sends its checksum last."""
    encoded = encode(tensor, chunk_bytes=4096, crc_in_trailer=True)
    raw = b"".join(bytes(c) for c in encoded.chunks)
    return encoded.header, list(chunk_messages(encoded)), pb.TensorTrailer(crc32c=crc32c.crc32c(raw))


def feed_trailed(header, chunks, trailers, expected_numel=5000):
    assembler = TensorAssembler(header, expected_numel=expected_numel)
    for frame in chunks:
        assembler.add(frame)
    for trailer in trailers:
        assembler.add_trailer(trailer)
    return assembler.finish()


def test_a_trailed_stream_round_trips_and_a_wrong_trailer_checksum_is_rejected():
    tensor = torch.randn(5000)
    header, chunks, trailer = trailed(tensor)
    assert torch.equal(feed_trailed(header, chunks, [trailer]), tensor)
    with pytest.raises(CodecError, match="checksum mismatch: .*, trailer says"):
        feed_trailed(header, chunks, [pb.TensorTrailer(crc32c=trailer.crc32c ^ 1)])


def test_trailers_missing_unannounced_doubled_or_early_are_rejected():
    header, chunks, trailer = trailed(torch.randn(5000))
    with pytest.raises(CodecError, match="stream ended without the trailer its header announced"):
        feed_trailed(header, chunks, [])
    with pytest.raises(CodecError, match="a second trailer"):
        feed_trailed(header, chunks, [trailer, trailer])
    with pytest.raises(CodecError, match="chunk 4 arrived after the trailer"):
        assembler = TensorAssembler(header, expected_numel=5000)
        for chunk in chunks[:4]:
            assembler.add(chunk)
        assembler.add_trailer(trailer)
        assembler.add(chunks[4])
    plain_header, plain_chunks = frames(torch.randn(5000))
    with pytest.raises(CodecError, match="the header carries the checksum and announced none"):
        feed_trailed(plain_header, plain_chunks, [trailer])


def test_oversized_and_empty_chunks_are_rejected():
    header, chunks = frames(torch.randn(5000))
    with pytest.raises(CodecError, match="chunk 0 has 0 bytes"):
        feed(header, [pb.Chunk(index=0, data=b"")], 5000)
    big = encode(torch.randn(2 * codec.MAX_CHUNK_BYTES // 4), pb.FLOAT32, codec.MAX_CHUNK_BYTES)
    huge = pb.Chunk(index=0, data=bytes(codec.MAX_CHUNK_BYTES + 1))
    with pytest.raises(CodecError, match=f"{codec.MAX_CHUNK_BYTES + 1} bytes"):
        feed(big.header, [huge], big.header.numel)


def test_encode_refuses_bad_arguments():
    with pytest.raises(ValueError, match="flat tensor"):
        encode(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="Invalid chunk size"):
        encode(torch.zeros(4), chunk_bytes=codec.MAX_CHUNK_BYTES + 1)
    with pytest.raises(ValueError, match="Invalid transport dtype"):
        codec.dtype_from_name("int8")


def test_encode_casts_into_the_given_tensor_and_refuses_an_unfit_one():
    tensor = torch.randn(5000)
    cast = torch.empty(5000, dtype=torch.bfloat16)
    encoded = encode(tensor, pb.BFLOAT16, 4096, cast_into=cast)
    assert torch.equal(cast, tensor.to(torch.bfloat16))
    assert bytes(encoded.chunks[0]) == bytes(cast.view(torch.uint8).numpy()[:4096])
    assert encode(tensor, pb.FLOAT32, cast_into=torch.empty(1)).header.numel == 5000, "no cast: nothing to write"
    with pytest.raises(ValueError, match="cast_into must be a contiguous CPU tensor of torch.bfloat16"):
        encode(tensor, pb.BFLOAT16, cast_into=torch.empty(5000))
