"""The wire fast path: the same bytes protobuf writes, views on receipt, and a plain protobuf peer
that interoperates with the real server."""
import crc32c
import grpc
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gapaware import WorkerClient
from gapaware.common.codec import TensorAssembler, chunk_messages, encode
from gapaware.common.wire import (
    ChunkView, chunk_frame, chunk_frames, frame_parser, serialize_frame, trailer_frame, whole_message, whole_parser,
)
from gapaware.proto import parameter_server_pb2 as pb
from gapaware.proto import parameter_server_pb2_grpc as pb_grpc


@pytest.mark.parametrize("frame_type", [pb.PushFrame, pb.PullFrame])
@pytest.mark.parametrize("index", [0, 1, 127, 128, 300_000])
@pytest.mark.parametrize("length", [1, 127, 128, 16_384, 1 << 20])
def test_chunk_frame_is_byte_identical_to_protobuf(frame_type, index, length):
    data = bytes(range(256)) * (length // 256) + bytes(length % 256)
    ours = chunk_frame(index, memoryview(data))
    assert ours == frame_type(chunk=pb.Chunk(index=index, data=data)).SerializeToString()
    parsed = frame_parser(frame_type)(ours)
    assert isinstance(parsed, ChunkView) and parsed.index == index and parsed.data == data
    assert parsed.data.obj is ours, "the received chunk must be a view, not a copy"


@pytest.mark.parametrize("frame_type", [pb.PushFrame, pb.PullFrame])
@pytest.mark.parametrize("crc", [0, 1, 0x7F, 0xDEADBEEF, 2**32 - 1])
def test_trailer_frame_is_byte_identical_to_protobuf_and_parses_back(frame_type, crc):
    ours = trailer_frame(crc)
    assert ours == frame_type(trailer=pb.TensorTrailer(crc32c=crc)).SerializeToString()
    assert frame_parser(frame_type)(ours) == pb.TensorTrailer(crc32c=crc)


@pytest.mark.parametrize("numel", [1, 1000, 1024, 1025])
def test_a_stream_with_its_checksum_in_the_trailer_round_trips(numel):
    tensor = torch.randn(numel)
    encoded = encode(tensor, chunk_bytes=1024, crc_in_trailer=True)
    assert encoded.header.crc_in_trailer and encoded.header.crc32c == 0
    frames = [frame_parser(pb.PullFrame)(frame) for frame in chunk_frames(encoded)]
    assert len(frames) == encoded.header.chunk_count + 1
    assert frames[-1] == pb.TensorTrailer(crc32c=crc32c.crc32c(tensor.numpy().tobytes()))
    assembler = TensorAssembler(encoded.header, expected_numel=numel)
    for chunk in frames[:-1]:
        assembler.add(chunk)
    assembler.add_trailer(frames[-1])
    assert torch.equal(assembler.finish(), tensor)


@settings(max_examples=200, deadline=None)
@given(index=st.integers(0, 2**32 - 1), data=st.binary(min_size=0, max_size=3000))
def test_protobuf_chunk_frames_parse_to_the_same_chunk(index, data):
    raw = pb.PullFrame(chunk=pb.Chunk(index=index, data=data)).SerializeToString()
    parsed = frame_parser(pb.PullFrame)(raw)
    assert (parsed.index, bytes(parsed.data)) == (index, data)


def test_headers_unknown_fields_and_empty_frames_take_the_protobuf_path():
    header = pb.PushHeader(worker_id=7, base_version=3, tensor=pb.TensorHeader(dtype=pb.FLOAT32, numel=5))
    assert frame_parser(pb.PushFrame)(serialize_frame(pb.PushFrame(header=header))) == header
    # A chunk with a field this version does not know (field 3, varint 1): parsed, not refused.
    inner = b"\x08\x05\x12\x03abc\x18\x01"
    parsed = frame_parser(pb.PushFrame)(b"\x12" + bytes([len(inner)]) + inner)
    assert (parsed.index, bytes(parsed.data)) == (5, b"abc")
    assert frame_parser(pb.PushFrame)(b"") is None


@pytest.mark.parametrize("message_type, header", [
    (pb.WholePush, pb.PushHeader(worker_id=3, base_version=9, seq=2, loss=0.5, tensor=pb.TensorHeader(numel=4))),
    (pb.WholePull, pb.PullHeader(version=5, finished=True, push=pb.PushReply(version=5, applied=True))),
])
@pytest.mark.parametrize("length", [0, 1, 127, 128, 1 << 20, 4 << 20])
def test_whole_message_is_byte_identical_to_protobuf(message_type, header, length):
    data = bytes(range(256)) * (length // 256) + bytes(length % 256)
    ours = whole_message(header, memoryview(data))
    assert ours == message_type(header=header, data=data).SerializeToString()
    parsed = whole_parser(message_type, type(header))(ours)
    assert parsed.header == header and parsed.data == data
    if length:
        assert parsed.data.obj is ours, "the received data must be a view, not a copy"


@settings(max_examples=200, deadline=None)
@given(version=st.integers(0, 2**64 - 1), data=st.binary(max_size=3000), reverse=st.booleans())
def test_whole_messages_protobuf_writes_parse_to_the_same_fields(version, data, reverse):
    """Also with the fields in the other order (legal protobuf, not what we write): the fallback path."""
    header = pb.PullHeader(version=version)
    if reverse:
        raw = pb.WholePull(data=data).SerializeToString() + pb.WholePull(header=header).SerializeToString()
    else:
        raw = pb.WholePull(header=header, data=data).SerializeToString()
    parsed = whole_parser(pb.WholePull, pb.PullHeader)(raw)
    assert parsed.header == header and bytes(parsed.data) == data


def _plain_stub_pull(stub, worker_id, numel, dtype=pb.FLOAT32):
    frames = list(stub.Pull(pb.PullRequest(worker_id=worker_id, dtype=dtype), timeout=30))
    assert frames[0].header.tensor.crc_in_trailer and frames[-1].WhichOneof("frame") == "trailer"
    assembler = TensorAssembler(frames[0].header.tensor, expected_numel=numel)
    for frame in frames[1:-1]:
        assembler.add(frame.chunk)
    assembler.add_trailer(frames[-1].trailer)
    return frames[0].header.version, assembler.finish()


def _plain_push_frames(worker_id, base_version, grad, crc_in_trailer=False):
    encoded = encode(grad, chunk_bytes=4096, crc_in_trailer=crc_in_trailer)
    yield pb.PushFrame(header=pb.PushHeader(worker_id=worker_id, base_version=base_version, tensor=encoded.header))
    for chunk in chunk_messages(encoded):
        yield pb.PushFrame(chunk=chunk)
    if crc_in_trailer:
        yield pb.PushFrame(trailer=pb.TensorTrailer(crc32c=crc32c.crc32c(b"".join(encoded.chunks))))


def test_a_plain_protobuf_peer_interoperates_with_the_server_and_a_fast_client(servers):
    server = servers("--task", "digits-mlp", "--policy", "asgd", "--momentum", "0", "--lr", "0.5",
                     "--schedule", "constant", "--max-updates", "100")
    with grpc.insecure_channel(server.address) as channel, WorkerClient(server.address, timeout=30) as fast:
        plain = pb_grpc.ParameterServerStub(channel)
        join = plain.Join(pb.JoinRequest(hostname="plain-protobuf"), timeout=30)
        numel = sum(int(torch.Size(p.shape).numel()) for p in join.layout.params)
        fast.join()
        version, theta = _plain_stub_pull(plain, join.worker_id, numel)
        fast_version, fast_theta = fast.pull()
        assert version == fast_version == 0 and torch.equal(theta, fast_theta)

        grad = torch.linspace(-1, 1, numel)
        reply = plain.Push(_plain_push_frames(join.worker_id, version, grad), timeout=30)
        assert (reply.version, reply.applied) == (1, True)
        expected = theta - 0.5 * grad
        assert fast.push(torch.zeros(numel), fast_version).applied  # a zero step: θ stays as the plain push left it
        version, after = _plain_stub_pull(plain, join.worker_id, numel)
        assert version == 2 and torch.equal(after, expected), "the plain peer's gradient was applied exactly"

        frames = list(plain.PushPull(_plain_push_frames(join.worker_id, version, torch.zeros(numel),
                                                        crc_in_trailer=True), timeout=30))
        assert frames[0].header.push.applied and frames[0].header.version == 3, "no ready frame unless asked"
        assert sum(len(f.chunk.data) for f in frames[1:]) == numel * 4

        assert join.sends_ready
        push = list(_plain_push_frames(join.worker_id, 3, torch.zeros(numel)))
        push[0].header.await_ready = True
        frames = list(plain.PushPull(iter(push), timeout=30))
        assert frames[0].WhichOneof("frame") == "ready" and frames[1].header.push.version == 4
        assert torch.equal(torch.cat([torch.frombuffer(bytearray(f.chunk.data), dtype=torch.float32)
                                      for f in frames[2:] if f.WhichOneof("frame") == "chunk"]), expected)

        whole = plain.PullWhole(pb.PullRequest(worker_id=join.worker_id), timeout=30)
        assert whole.header.version == 4 and whole.header.tensor.chunk_count == 1
        assert torch.equal(torch.frombuffer(bytearray(whole.data), dtype=torch.float32), expected)
        encoded = encode(grad, chunk_bytes=numel * 4)
        reply = plain.PushPullWhole(pb.WholePush(
            header=pb.PushHeader(worker_id=join.worker_id, base_version=4, tensor=encoded.header),
            data=bytes(encoded.chunks[0])), timeout=30)
        assert reply.header.push.applied and reply.header.version == 5
        assert torch.equal(torch.frombuffer(bytearray(reply.data), dtype=torch.float32), expected - 0.5 * grad)


@pytest.mark.parametrize("transport_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("policy", ["gap-aware", "dana-ga"])
def test_one_message_and_streamed_calls_give_the_same_run(inprocess_servers, transport_dtype, policy):
    """Two identical servers take the same pushes, one through PullWhole/PushPullWhole, the other
    through the streamed Pull/PushPull: every reply and the final parameters are identical."""
    from tests.inprocess import small_state
    servers = [inprocess_servers(small_state(5000, policy=policy)) for _ in range(2)]
    clients = [WorkerClient(servers[0].address, transport_dtype=transport_dtype, timeout=20),
               WorkerClient(servers[1].address, transport_dtype=transport_dtype, timeout=20, one_message_bytes=0,
                            chunk_bytes=4096)]
    try:
        pulled = []
        for client in clients:
            client.join()
            pulled.append(client.pull())
        assert pulled[0][0] == pulled[1][0] and torch.equal(pulled[0][1], pulled[1][1])
        assert clients[0]._one_message() and not clients[1]._one_message(), "the two paths under comparison"
        version = pulled[0][0]
        for step in range(4):
            grad = torch.randn(5000, generator=torch.Generator().manual_seed(step))
            (one, v1, theta1), (streamed, v2, theta2) = (c.push_pull(grad, version) for c in clients)
            assert one == streamed and v1 == v2 and torch.equal(theta1, theta2)
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
