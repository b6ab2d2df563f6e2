"""Thousands of mutated push streams, pulls and joins against a live server.

The server (its real gRPC stack, in this process) must never crash, answer every refusal
with a deliberate status code (never UNKNOWN, which an unhandled exception gives), leave
its state exactly as it was on every refusal, accept only streams that really are valid,
and hold no memory for refused streams.
"""
from __future__ import annotations

import gc
import os

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gapaware import WorkerClient
from gapaware.common.transport import MIN_CHUNK_BYTES, Assembler, ChunkView, TransportError
from gapaware.common.layout import ParamLayout
from gapaware.proto import parameter_server_pb2 as pb
from gapaware.proto import parameter_server_pb2_grpc as pb_grpc
from gapaware.server.servicer import SERVICE_NAME
from gapaware.worker.client import CHANNEL_OPTIONS
from tests.inprocess import InProcessServer, StateSnapshot, small_state
from tests.test_bad_input import CHUNK_BYTES, push_frames

NUMEL = 2500  # 10000 bytes: three chunks
DELIBERATE = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
              grpc.StatusCode.RESOURCE_EXHAUSTED}
UINT64, UINT32 = 2**64 - 1, 2**32 - 1


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Target:
    """The live server, a worker that keeps a current pull, and a raw stub for mutated messages."""

    def __init__(self) -> None:
        self.server = InProcessServer(small_state(NUMEL, policy="dana-ga", momentum=0.9))
        self.channel = grpc.insecure_channel(self.server.address, options=CHANNEL_OPTIONS)
        self.stub = pb_grpc.ParameterServerStub(self.channel)
        self.raw_push = self.channel.stream_stream(f"/{SERVICE_NAME}/Push")
        self.worker = WorkerClient(self.server.address, chunk_bytes=CHUNK_BYTES, timeout=20)
        joined = self.worker.join()
        self.worker_id, self.secret = joined.worker_id, joined.worker_secret
        self.version, _ = self.worker.pull()
        self.accepted = self.refused = 0

    def close(self) -> None:
        self.worker.close()
        self.channel.close()
        self.server.close()


def _set(message, values: dict) -> None:
    for name, value in values.items():
        if value is not None:
            setattr(message, name, value)


header_changes = st.fixed_dictionaries({}, optional={
    "worker_id": st.one_of(st.just(1), st.integers(0, UINT64)),
    "base_version": st.integers(0, UINT64),
    "samples": st.integers(0, UINT32),
    "loss": st.floats(allow_nan=True, allow_infinity=True),
    "pull": st.booleans(),
    "pull_dtype": st.integers(0, 6),
})
tensor_changes = st.fixed_dictionaries({}, optional={
    "dtype": st.integers(0, 6),
    "numel": st.one_of(st.integers(NUMEL - 2, NUMEL + 2), st.integers(0, UINT64)),
    "chunk_count": st.one_of(st.integers(0, 6), st.integers(0, UINT32)),
})
frame_edits = st.lists(st.one_of(
    st.tuples(st.just("drop"), st.integers(0, 3)),
    st.tuples(st.just("duplicate"), st.integers(0, 3)),
    st.tuples(st.just("swap"), st.integers(0, 3), st.integers(0, 3)),
    st.tuples(st.just("recrc"), st.integers(1, 3), st.integers(0, UINT32)),
    st.tuples(st.just("reindex"), st.integers(0, 3), st.integers(0, UINT32)),
    st.tuples(st.just("flip"), st.integers(1, 3), st.integers(0, 4095), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(1, 3), st.integers(0, 4096)),
    st.tuples(st.just("extend"), st.integers(1, 3), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("nonfinite"), st.integers(0, NUMEL - 1), st.sampled_from(["nan", "inf", "-inf"])),
), max_size=3)
requests = st.one_of(
    st.tuples(st.just("push"), header_changes, tensor_changes, frame_edits),
    st.tuples(st.just("raw"), st.lists(st.binary(max_size=64), max_size=4)),
    st.tuples(st.just("pull"), st.integers(0, UINT64), st.integers(0, 6)),
    st.tuples(st.just("join"), st.lists(st.tuples(st.text(max_size=8), st.lists(st.integers(0, 5000), max_size=3)),
                                         max_size=3), st.text(alphabet="0123456789abcdef", max_size=64)),
)


def mutated_push(target: Target, header: dict, tensor: dict, edits: list) -> list[pb.PushFrame]:
    grad = torch.randn(NUMEL, generator=torch.Generator().manual_seed(len(edits)))
    for edit in edits:
        if edit[0] == "nonfinite":
            grad[edit[1]] = float(edit[2])
    frames = push_frames(target.worker_id, target.version, grad, worker_secret=target.secret)
    _set(frames[0].header, header)
    _set(frames[0].header.tensor, tensor)
    for edit in edits:
        kind, at = edit[0], edit[1] % len(frames) if frames else 0
        if not frames or kind == "nonfinite":
            continue
        if kind == "drop":
            del frames[at]
        elif kind == "duplicate":
            frames.insert(at, frames[at])
        elif kind == "swap":
            other = edit[2] % len(frames)
            frames[at], frames[other] = frames[other], frames[at]
        elif frames[at].WhichOneof("frame") == "chunk":
            chunk = pb.Chunk()
            chunk.CopyFrom(frames[at].chunk)
            data = bytearray(chunk.data)
            if kind == "reindex":
                chunk.index = edit[2]
            elif kind == "recrc":
                chunk.crc32c = edit[2]
            elif kind == "flip" and data:
                data[edit[2] % len(data)] ^= edit[3]
            elif kind == "truncate":
                del data[edit[2]:]
            elif kind == "extend":
                data += edit[2]
            chunk.data = bytes(data)
            frames[at] = pb.PushFrame(chunk=chunk)
    return frames


def really_valid(frames: list[pb.PushFrame], target: Target) -> bool:
    """Whether the stream is one the server should accept: checked with the transport, independently."""
    if not frames or frames[0].WhichOneof("frame") != "header":
        return False
    header = frames[0].header
    if (header.worker_id, header.base_version) != (target.worker_id, target.version):
        return False
    if header.pull and header.pull_dtype not in (pb.DTYPE_UNSPECIFIED, pb.FLOAT32, pb.BFLOAT16, pb.FLOAT16, pb.INT8,
                                                 pb.FLOAT8_E4M3FN):
        return False
    try:
        assembler = Assembler(header.tensor, numel=NUMEL, min_chunk_bytes=MIN_CHUNK_BYTES)
        for frame in frames[1:]:
            if frame.WhichOneof("frame") != "chunk":
                return False
            assembler.add(ChunkView(frame.chunk.index, memoryview(frame.chunk.data), frame.chunk.crc32c))
        return bool(torch.isfinite(assembler.finish()).all())
    except TransportError:
        return False


def send(target: Target, request: tuple) -> bool | None:
    """Sends one request; True when the server accepted a push it should have, None for no push."""
    kind = request[0]
    if kind == "push":
        frames = mutated_push(target, *request[1:])
        list(target.stub.Push(iter(frames), timeout=20))
        return really_valid(frames, target)
    if kind == "raw":
        list(target.raw_push(iter(request[1]), timeout=20))
        return False
    if kind == "pull":
        if request[1] == target.worker_id:  # pulling for our own worker is valid and changes nothing
            return None
        list(target.stub.Pull(pb.PullRequest(worker_id=request[1], dtype=request[2]), timeout=20))
        return False
    layout = ParamLayout(tuple(name for name, _ in request[1]), tuple(tuple(shape) for _, shape in request[1]))
    message = layout.to_proto()
    message.fingerprint = request[2]
    reply = target.stub.Join(pb.JoinRequest(layout=message), timeout=20)
    target.stub.Leave(pb.LeaveRequest(worker_id=reply.worker_id, worker_secret=reply.worker_secret), timeout=20)
    return None


def check_one(target: Target, request: tuple) -> None:
    state = target.server.state
    before = StateSnapshot.of(state)
    workers_before = len(state.live_workers())
    try:
        valid = send(target, request)
    except grpc.RpcError as error:
        target.refused += 1
        assert error.code() in DELIBERATE, \
            (error.code(), error.details(), request)
        before.assert_same(StateSnapshot.of(state))
        assert len(state.live_workers()) == workers_before
        return
    if valid is None:  # a join (left again) or our own pull: nothing of the run changed
        before.assert_same(StateSnapshot.of(state))
        return
    assert valid, f"the server accepted an invalid request: {request}"
    target.accepted += 1
    assert state.version == before.version + 1
    target.version, _ = target.worker.pull()


def test_mutated_requests_are_refused_precisely_and_change_nothing():
    target = Target()
    try:
        @settings(max_examples=2500, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(request=requests)
        def fuzz(request):
            check_one(target, request)

        for request in [("push", {}, {}, [])] * 20:  # warm up: buffers, scratch, gRPC's pools
            check_one(target, request)
        gc.collect()
        before = rss_bytes()
        fuzz()
        gc.collect()
        grown = rss_bytes() - before
        assert target.refused > 1000 and target.accepted > 20, (target.refused, target.accepted)
        assert target.worker.status().version == target.server.state.version, "the server still answers"
        print(f"fuzz: {target.refused} refused, {target.accepted} accepted, RSS grew {grown / 2**20:.1f} MiB")
        assert grown < 100 * 2**20, f"RSS grew {grown / 2**20:.0f} MiB over {target.refused} refused requests"
    finally:
        target.close()


def test_refused_streams_release_their_buffers(inprocess_servers):
    """Full-size gradients whose last chunk has a wrong checksum, refused once the whole tensor was buffered."""
    numel = 8 * 2**20  # 32 MiB of float32
    server = inprocess_servers(small_state(numel, policy="asgd", momentum=0.0))
    with WorkerClient(server.address, chunk_bytes=2**20, timeout=60) as client:
        secret = client.join().worker_secret
        version, theta = client.pull()
        version = client.push(torch.zeros(numel), base_version=version).version
        version, _ = client.pull()
        del theta
        with grpc.insecure_channel(server.address, options=CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.ParameterServerStub(channel)
            frames = push_frames(1, version, torch.ones(numel), worker_secret=secret)
            frames[-1].chunk.crc32c ^= 1
            gc.collect()
            before = rss_bytes()
            for _ in range(6):
                with pytest.raises(grpc.RpcError) as refused:
                    list(stub.Push(iter(frames), timeout=60))
                assert "checksum mismatch" in refused.value.details()
            gc.collect()
            grown = rss_bytes() - before
    print(f"refused 32 MiB pushes: RSS grew {grown / 2**20:.1f} MiB")
    assert grown < 3 * numel * 4, f"RSS grew {grown / 2**20:.0f} MiB over 6 refused 32 MiB pushes"
    assert server.state.version == 1
