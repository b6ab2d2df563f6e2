"""The tensor transport: exact round trips, the same bytes protobuf writes, a chunk refused where it
is wrong, and a plain protobuf peer that interoperates with the real server."""
import crc32c
import grpc
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gapaware import WorkerClient
from gapaware.common import transport
from gapaware.common.transport import Assembler, ChunkView, TransportError, chunk_frame, encode, frame_parser
from gapaware.proto import parameter_server_pb2 as pb
from gapaware.proto import parameter_server_pb2_grpc as pb_grpc
from tests.frames import encode_messages, push_stream


def received(tensor, dtype=pb.FLOAT32, chunk_bytes=transport.DEFAULT_CHUNK_BYTES, out=None):
    """``tensor`` encoded, each frame parsed as a receiver parses it, and assembled again."""
    header, frames = encode(tensor, dtype, chunk_bytes)
    assembler = Assembler(header, numel=tensor.numel(), out=out)
    parse = frame_parser(pb.PullFrame)
    for frame in frames:
        assembler.add(parse(frame))
    return header, assembler.finish()


def chunks(tensor, dtype=pb.FLOAT32, chunk_bytes=4096):
    header, frames = encode(tensor, dtype, chunk_bytes)
    return header, [frame_parser(pb.PullFrame)(frame) for frame in frames]


def assemble(header, frames, numel):
    assembler = Assembler(header, numel=numel)
    for frame in frames:
        assembler.add(frame)
    return assembler.finish()


@pytest.mark.parametrize("numel", [0, 1, 262_143, 262_144, 262_145])
def test_float32_roundtrip_is_bit_exact(numel):
    tensor = torch.randn(numel)
    header, back = received(tensor)
    assert header.chunk_count == -(-numel * 4 // transport.DEFAULT_CHUNK_BYTES)
    assert torch.equal(back, tensor)


@pytest.mark.parametrize("dtype,torch_dtype", [(pb.BFLOAT16, torch.bfloat16), (pb.FLOAT16, torch.float16)])
@pytest.mark.parametrize("chunk_bytes", [2, 4095, 4096])
def test_half_precision_halves_the_bytes_and_rounds_like_torch(dtype, torch_dtype, chunk_bytes):
    tensor = torch.randn(5000)
    header, back = received(tensor, dtype, chunk_bytes)
    assert header.chunk_count == -(-5000 * 2 // (chunk_bytes // 2 * 2))
    assert back.dtype == torch.float32 and torch.equal(back, tensor.to(torch_dtype).float())


def test_the_assembler_writes_into_the_given_tensor():
    out = torch.empty(5000)
    tensor = torch.randn(5000)
    _, back = received(tensor, out=out)
    assert back is out and torch.equal(out, tensor)


@pytest.mark.parametrize("out", [torch.empty(4999), torch.empty(5000, dtype=torch.float64), torch.empty(10000)[::2]])
def test_the_assembler_refuses_an_unfit_out_tensor(out):
    header, _ = encode(torch.zeros(5000))
    with pytest.raises(ValueError, match="out must be a contiguous flat float32 CPU tensor of 5000 elements"):
        Assembler(header, numel=5000, out=out)


def test_a_corrupted_chunk_is_refused_by_its_checksum():
    header, frames = chunks(torch.randn(3000))
    data = bytearray(frames[1].data)
    data[7] ^= 0x10
    frames[1] = ChunkView(1, memoryview(bytes(data)), frames[1].crc32c)
    with pytest.raises(TransportError, match="checksum mismatch in chunk 1"):
        assemble(header, frames, 3000)


def test_a_header_that_lies_is_refused_before_anything_is_allocated():
    header, _ = encode(torch.zeros(3000))
    with pytest.raises(TransportError, match="tensor has 3000 elements but 2999 are expected"):
        Assembler(header, numel=2999)
    for count in (0, 3001):
        header.chunk_count = count
        with pytest.raises(TransportError, match=f"header announces {count} chunks for 12000 bytes"):
            Assembler(header, numel=3000)
    with pytest.raises(TransportError, match="unknown tensor dtype 9"):
        Assembler(pb.TensorHeader(dtype=9, numel=3000, chunk_count=1), numel=3000)


def test_chunks_out_of_order_missing_extra_or_not_chunks_are_refused():
    header, frames = chunks(torch.randn(3000))
    cases = {
        "chunk 1 arrived where chunk 0 was expected": [frames[1], frames[0], frames[2]],
        "stream ended after 2 of 3 chunks": frames[:2],
        "more chunks than the 3 the header announced": [*frames, ChunkView(3, memoryview(b"\0" * 4), 0)],
        "a header arrived among the chunks": [frames[0], pb.PushHeader(), *frames[1:]],
        "a frame with no chunk arrived among the chunks": [frames[0], None],
    }
    for message, sequence in cases.items():
        with pytest.raises(TransportError, match=message):
            assemble(header, sequence, 3000)


@pytest.mark.parametrize("data, message", [
    (b"", "has 0 bytes"), (b"\0" * 6, "has 6 bytes"), (b"\0" * (transport.MAX_CHUNK_BYTES + 4), "has 4194308 bytes"),
])
def test_empty_oversized_and_partial_element_chunks_are_refused(data, message):
    header = pb.TensorHeader(dtype=pb.FLOAT32, numel=2**21, chunk_count=3)
    with pytest.raises(TransportError, match=message):
        Assembler(header, numel=2**21).add(ChunkView(0, memoryview(data), crc32c.crc32c(data)))


def test_encode_refuses_bad_arguments():
    with pytest.raises(ValueError, match="Invalid chunk size"):
        encode(torch.zeros(4), chunk_bytes=transport.MAX_CHUNK_BYTES + 1)
    with pytest.raises(ValueError, match="expected a flat tensor"):
        encode(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="Invalid transport dtype: 'int4'"):
        transport.dtype_from_name("int4")


@pytest.mark.parametrize("frame_type", [pb.PushFrame, pb.PullFrame])
@pytest.mark.parametrize("index", [0, 1, 127, 128, 300_000])
@pytest.mark.parametrize("length", [4, 128, 16_384, 1 << 20])
def test_chunk_frame_is_byte_identical_to_protobuf_and_read_in_place(frame_type, index, length):
    data = bytes(range(256)) * (length // 256) + bytes(length % 256)
    ours = chunk_frame(index, memoryview(data))
    expected = pb.Chunk(index=index, data=data, crc32c=crc32c.crc32c(data))
    assert ours == frame_type(chunk=expected).SerializeToString()
    parsed = frame_parser(frame_type)(ours)
    assert (parsed.index, parsed.data, parsed.crc32c) == (index, data, expected.crc32c)
    assert parsed.data.obj is ours, "the received chunk must be a view, not a copy"


@settings(max_examples=200, deadline=None)
@given(index=st.integers(0, 2**32 - 1), data=st.binary(max_size=3000), crc=st.integers(0, 2**32 - 1))
def test_chunks_protobuf_writes_parse_to_the_same_chunk(index, data, crc):
    raw = pb.PullFrame(chunk=pb.Chunk(index=index, data=data, crc32c=crc)).SerializeToString()
    parsed = frame_parser(pb.PullFrame)(raw)
    assert (parsed.index, bytes(parsed.data), parsed.crc32c) == (index, data, crc)


def test_headers_unknown_fields_and_empty_frames_take_the_protobuf_path():
    header = pb.PushHeader(worker_id=7, base_version=3, tensor=pb.TensorHeader(dtype=pb.FLOAT32, numel=5))
    assert frame_parser(pb.PushFrame)(pb.PushFrame(header=header).SerializeToString()) == header
    # A chunk with a field this version does not know (field 4, varint 1): parsed, not refused.
    inner = b"\x08\x05\x12\x03abc\x20\x01"
    parsed = frame_parser(pb.PushFrame)(b"\x12" + bytes([len(inner)]) + inner)
    assert (parsed.index, bytes(parsed.data)) == (5, b"abc")
    assert frame_parser(pb.PushFrame)(b"") is None
    assert frame_parser(pb.PullFrame)(pb.PullFrame(ready=pb.PushReady()).SerializeToString()) == pb.PushReady()


def _plain_pull(stub, frames, numel: int) -> tuple[pb.PullHeader, torch.Tensor]:
    """A reply read with generated protobuf classes only."""
    frames = [frame for frame in frames if frame.WhichOneof("frame") != "ready"]
    header = frames[0].header
    data = b"".join(frame.chunk.data for frame in frames[1:])
    assert all(frame.chunk.crc32c == crc32c.crc32c(frame.chunk.data) for frame in frames[1:])
    return header, torch.frombuffer(bytearray(data), dtype=torch.float32) if data else torch.empty(0)


def test_a_plain_protobuf_peer_interoperates_with_the_server_and_a_fast_client(servers):
    server = servers("--task", "digits-mlp", "--policy", "asgd", "--momentum", "0", "--lr", "0.5",
                     "--schedule", "constant", "--max-updates", "100")
    with grpc.insecure_channel(server.address) as channel, WorkerClient(server.address, timeout=30) as fast:
        plain = pb_grpc.ParameterServerStub(channel)
        join = plain.Join(pb.JoinRequest(hostname="plain-protobuf"), timeout=30)
        numel = sum(int(torch.Size(p.shape).numel()) for p in join.layout.params)
        fast.join()
        pull = pb.PullRequest(worker_id=join.worker_id, worker_secret=join.worker_secret)
        header, theta = _plain_pull(plain, plain.Pull(pull, timeout=30), numel)
        fast_version, fast_theta = fast.pull()
        assert header.version == fast_version == 0 and torch.equal(theta, fast_theta)

        grad = torch.linspace(-1, 1, numel)
        replies = list(plain.Push(iter(push_stream(join.worker_id, 0, grad, chunk_bytes=4096,
                                                   worker_secret=join.worker_secret)), timeout=30))
        assert replies[0].WhichOneof("frame") == "ready" and len(replies) == 2
        assert (replies[1].header.push.version, replies[1].header.push.applied) == (1, True)
        expected = theta - 0.5 * grad
        assert fast.push(torch.zeros(numel), fast_version).applied  # a zero step: θ stays as the plain push left it

        header, after = _plain_pull(plain, plain.Pull(pull, timeout=30), numel)
        assert header.version == 2 and torch.equal(after, expected), "the plain peer's gradient was applied exactly"
        stream = push_stream(join.worker_id, 2, torch.zeros(numel), pull=True, worker_secret=join.worker_secret)
        header, after = _plain_pull(plain, plain.Push(iter(stream), timeout=30), numel)
        assert header.push.applied and header.version == 3 and torch.equal(after, expected)


@pytest.mark.parametrize("transport_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("policy", ["gap-aware", "dana-ga"])
def test_chunk_sizes_do_not_change_the_run(inprocess_servers, transport_dtype, policy):
    """Two identical servers take the same pushes, in 1 MiB chunks and in 4 KiB ones: every reply and
    the final parameters are identical, and each reply holds the parameters of its own pull."""
    from tests.inprocess import small_state
    servers = [inprocess_servers(small_state(5000, policy=policy)) for _ in range(2)]
    clients = [WorkerClient(servers[0].address, transport_dtype=transport_dtype, timeout=20),
               WorkerClient(servers[1].address, transport_dtype=transport_dtype, timeout=20, chunk_bytes=4096)]
    try:
        pulled = []
        for client in clients:
            client.join()
            pulled.append(client.pull())
        assert pulled[0][0] == pulled[1][0] and torch.equal(pulled[0][1], pulled[1][1])
        version = pulled[0][0]
        for step in range(4):
            grad = torch.randn(5000, generator=torch.Generator().manual_seed(step))
            (one, v1, theta1), (other, v2, theta2) = (c.push_pull(grad, version) for c in clients)
            assert one == other and v1 == v2 and torch.equal(theta1, theta2)
            if policy == "gap-aware":  # sends θ itself (DANA-GA sends its look-ahead)
                sent = servers[0].state.theta.to(getattr(torch, transport_dtype)).float()
                assert torch.equal(theta1, sent), "reused send buffers must hold this pull's parameters"
            version = v1
        assert torch.equal(servers[0].state.theta, servers[1].state.theta)
    finally:
        for client in clients:
            client.close()


@pytest.mark.parametrize("window_mib", [0, 1])
def test_a_model_bigger_than_the_receive_window_moves_exactly(inprocess_servers, window_mib):
    """8 MB pushed and pulled through 1 MiB stream windows (and gRPC's automatic window): the
    window paces the transfer, it never truncates or reorders it."""
    from gapaware.server.app import ServerOptions, receive_window_options
    from tests.inprocess import small_state
    assert bool(receive_window_options(window_mib)) == (window_mib > 0)
    numel = 2_000_000
    server = inprocess_servers(small_state(numel, policy="asgd", momentum=0.0), ServerOptions(receive_window_mib=window_mib))
    with WorkerClient(server.address, timeout=60) as client:
        client.join()
        version, theta = client.pull()
        grad = torch.linspace(-1, 1, numel)
        result, version, after = client.push_pull(grad, version)
        assert result.applied and torch.equal(after, torch.add(theta, grad, alpha=-0.1))


def test_encoded_messages_hold_what_the_fast_frames_hold():
    tensor = torch.randn(3000)
    messages = encode_messages(tensor, chunk_bytes=4096)
    assert [len(chunk.data) for chunk in messages.chunks] == [4096, 4096, 3808]
    assert b"".join(chunk.data for chunk in messages.chunks) == tensor.numpy().tobytes()
