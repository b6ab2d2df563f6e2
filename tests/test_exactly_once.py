"""Exactly-once pushes: a retried push counts once, a push cut off mid-stream changes nothing."""
import threading
import time

import grpc
import pytest
import torch

from gapaware import WorkerClient
from gapaware.proto import parameter_server_pb2 as pb
from gapaware.proto import parameter_server_pb2_grpc as pb_grpc
from gapaware.server.errors import BadPush
from gapaware.worker.retry import RetryPolicy, call_with_retries
from tests.frames import encode_messages
from tests.tcp_proxy import ReplyDroppingProxy
from tests.test_checkpoint import NUMEL, make_state
from tests.waiting import wait_for


def test_state_applies_a_repeated_seq_once_and_refuses_an_older_one():
    state = make_state("gap-aware")
    worker = state.join("h", "cpu", None).worker_id
    version, _ = state.pull(worker)
    first = state.push(state.admit(worker, torch.ones(NUMEL), base_version=version, seq=1))
    theta = state.theta.clone()
    again = state.push(state.admit(worker, torch.ones(NUMEL), base_version=version, seq=1))
    assert first.applied and not again.applied
    assert (again.version, again.staleness, again.mean_gap) == (first.version, first.staleness, first.mean_gap)
    assert state.version == 1 and state.totals()["pushes"] == 1 and torch.equal(state.theta, theta)
    state.pull(worker)
    assert state.push(state.admit(worker, torch.ones(NUMEL), base_version=1, seq=2)).applied
    with pytest.raises(BadPush, match="older than its push 2"):
        state.push(state.admit(worker, torch.ones(NUMEL), base_version=2, seq=1))
    assert state.version == 2


def _wait_for_version(client: WorkerClient, version: int, timeout: float = 30.0) -> None:
    wait_for(lambda: client.status().version >= version, timeout, f"the server to reach version {version}")


def test_push_whose_reply_is_lost_and_is_retried_counts_once(servers):
    server = servers("--task", "digits-mlp", "--max-updates", "100")
    proxy = ReplyDroppingProxy(server.port)
    try:
        with WorkerClient(proxy.address, timeout=30) as worker, WorkerClient(server.address, timeout=10) as observer:
            worker.join()
            version, theta = worker.pull()
            grad, seq = torch.full_like(theta, 0.01), worker.next_seq()
            results = []
            attempts = []

            def push():
                attempts.append(seq)
                return worker.push_pull(grad, version, samples=32, seq=seq)

            proxy.drop_replies_after(grad.numel() * 4)  # the reply after the gradient is lost
            pusher = threading.Thread(target=lambda: results.append(call_with_retries(
                push, RetryPolicy(initial_backoff=0.2, max_backoff=1.0, give_up_after=30), what="push")))
            pusher.start()
            _wait_for_version(observer, 1)  # applied by the server; its reply is being dropped
            wait_for(lambda: proxy.dropped_bytes, 10, "the reply to be lost")  # it follows the update
            assert not results, "the reply must have been lost"
            proxy.cut()
            pusher.join(timeout=60)

            assert len(attempts) >= 2, "the lost reply must have made the client retry"
            (result, new_version, new_theta), = results
            assert not result.applied, "the retried copy is answered from the first one, not applied again"
            assert (result.version, result.staleness) == (1, 0)
            assert new_version == 1 and not torch.equal(new_theta, theta), "the retry still gets fresh parameters"
            status = observer.status()
            assert status.version == 1 and status.workers[0].pushes == 1
            follow_up = worker.push(grad, new_version)
            assert follow_up.applied and follow_up.version == 2
    finally:
        proxy.close()


def test_push_cut_off_mid_stream_changes_nothing(servers):
    server = servers("--task", "digits-mlp", "--max-updates", "100")
    with WorkerClient(server.address, timeout=10) as client:
        info = client.join()
        version, theta = client.pull()
        before = client.status()
        encoded = encode_messages(torch.ones_like(theta), pb.FLOAT32, chunk_bytes=4096)
        assert encoded.header.chunk_count > 3
        sent_two = threading.Event()
        never = threading.Event()

        def frames():
            yield pb.PushFrame(header=pb.PushHeader(worker_id=info.worker_id, worker_secret=info.worker_secret,
                                                    base_version=version, seq=1,
                                                    tensor=encoded.header))
            for index, chunk in enumerate(encoded.chunks):
                if index == 2:
                    sent_two.set()
                    never.wait(30)
                    return
                yield pb.PushFrame(chunk=chunk)

        channel = grpc.insecure_channel(server.address)
        call = pb_grpc.ParameterServerStub(channel).Push(frames(), timeout=30)
        assert next(call).WhichOneof("frame") == "ready"
        assert sent_two.wait(10)
        time.sleep(0.3)
        call.cancel()
        never.set()
        channel.close()
        time.sleep(0.3)

        after = client.status()
        assert after.version == before.version == 0
        assert after.workers[0].pushes == 0
        result = client.push(torch.zeros_like(theta), base_version=version)
        assert result.applied and result.staleness == 0, "the worker's snapshot survived the cut-off push"
        assert client.pull()[1].equal(theta), "a zero gradient after the cut-off push leaves θ as it was"
