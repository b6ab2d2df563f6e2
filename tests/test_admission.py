"""A push is admitted before its chunks travel: the server's ready frame lets them go.

The server receives GRADIENTS_IN_MEMORY pushes at a time. A push that waits for one of them sends
only its header: its chunks stay at the worker until the server's ready frame, instead of filling a
receive window in the server's gRPC buffers. These tests hold both gradient buffers with real
pushes that stop after their header, and watch what a third worker sends meanwhile.
"""
from __future__ import annotations

import sys
import threading
import time

import grpc
import pytest
import torch

from gapaware import WorkerClient
from gapaware.proto import parameter_server_pb2 as pb
from gapaware.proto import parameter_server_pb2_grpc as pb_grpc
from gapaware.server.admission import GRADIENTS_IN_MEMORY
from gapaware.worker import compression as encoder_module
from tests.frames import encode_messages
from tests.inprocess import small_state
from tests.waiting import wait_for

NUMEL = 3000
CHUNK_BYTES = 4096  # three chunks


def held_push(stub, joined: pb.JoinReply, grad: torch.Tensor, release: threading.Event):
    """A push that asks for the parameters after it, sends its header, and its chunks only once
    ``release`` is set."""
    encoded = encode_messages(grad, chunk_bytes=CHUNK_BYTES)

    def frames():
        yield pb.PushFrame(header=pb.PushHeader(worker_id=joined.worker_id, worker_secret=joined.worker_secret,
                                                base_version=0, tensor=encoded.header, pull=True))
        release.wait(timeout=30)
        yield from (pb.PushFrame(chunk=chunk) for chunk in encoded.chunks)

    return stub.Push(frames(), timeout=30)


def test_a_waiting_push_sends_no_chunk_until_the_server_admits_it(inprocess_servers, monkeypatch):
    server = inprocess_servers(small_state(NUMEL))
    chunks_started = threading.Event()

    real_encode = encoder_module.encode

    def watched_encode(*args, **kwargs):
        header, chunks = real_encode(*args, **kwargs)

        def watched():
            for chunk in chunks:
                chunks_started.set()
                yield chunk
        return header, watched()

    monkeypatch.setattr(encoder_module, "encode", watched_encode)
    release = threading.Event()
    with grpc.insecure_channel(server.address) as channel, \
            WorkerClient(server.address, chunk_bytes=CHUNK_BYTES, timeout=30) as third:
        stub = pb_grpc.ParameterServerStub(channel)
        holders = [stub.Join(pb.JoinRequest(hostname=f"holder-{i}"), timeout=30) for i in range(GRADIENTS_IN_MEMORY)]
        for joined in holders:  # version 0, as the pushes say
            list(stub.Pull(pb.PullRequest(worker_id=joined.worker_id, worker_secret=joined.worker_secret), timeout=30))
        third.join()
        version, _ = third.pull()
        calls = [held_push(stub, joined, torch.ones(NUMEL), release) for joined in holders]
        for call in calls:
            first = next(call)
            assert first.WhichOneof("frame") == "ready", "an admitted push is told to send its chunks"

        outcome = {}
        pusher = threading.Thread(target=lambda: outcome.update(
            reply=third.push_pull(torch.ones(NUMEL), version, out=torch.empty(NUMEL))))
        pusher.start()
        time.sleep(1.0)
        assert not chunks_started.is_set(), "the waiting push sent chunks before the server admitted it"
        assert pusher.is_alive()

        release.set()
        replies = [list(call) for call in calls]
        pusher.join(timeout=30)
        assert chunks_started.is_set() and not pusher.is_alive()
    result, version, theta = outcome["reply"]
    assert result.applied and all(frames[0].header.push.applied for frames in replies)
    assert sorted([*(frames[0].header.push.version for frames in replies), result.version]) == [1, 2, 3]
    assert server.state.version == 3


def test_a_push_refused_before_admission_ends_its_sender_at_once(inprocess_servers):
    """The refused push's request thread, waiting for a ready frame that will not come, ends with the
    call instead of at its deadline."""
    server = inprocess_servers(small_state(NUMEL))
    with WorkerClient(server.address, chunk_bytes=CHUNK_BYTES, timeout=30) as client, \
            grpc.insecure_channel(server.address) as channel:
        info = client.join()
        version, _ = client.pull()
        pb_grpc.ParameterServerStub(channel).Leave(
            pb.LeaveRequest(worker_id=info.worker_id, worker_secret=info.worker_secret), timeout=30)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as refused:
            client.push_pull(torch.ones(NUMEL), version)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        wait_for(lambda: not _waiting_senders(), 5, "the push's sender to stop waiting for a ready frame")
        assert time.monotonic() - started < 10
    assert server.state.version == 0


def _waiting_senders() -> int:
    """Threads inside a push's request stream (which waits for its ready frame)."""
    waiting = 0
    for frame in sys._current_frames().values():
        while frame is not None and frame.f_code.co_name != "requests":
            frame = frame.f_back
        waiting += frame is not None
    return waiting
