"""Leases: a silent worker is forgotten with its snapshot and per-worker policy state."""
import time

import grpc
import pytest
import torch

from gapaware import WorkerClient
from gapaware.server.errors import UnknownWorker
from gapaware.worker.heartbeat import Heartbeat
from tests.test_checkpoint import NUMEL, make_state


@pytest.mark.parametrize("policy", ["gap-aware", "dana-ga"])
def test_reaping_forgets_only_silent_workers_and_frees_their_state(policy):
    state = make_state(policy)
    silent, alive = (state.join("h", "cpu", None).worker_id for _ in range(2))
    for worker in (silent, alive):
        state.push(state.admit(worker, torch.ones(NUMEL), base_version=state.pull(worker)[0]))
        state.pull(worker)
    assert state.held_snapshots() == 2
    state.workers.get(silent).last_seen = time.monotonic() - 10
    assert [r.worker_id for r in state.reap(lease_seconds=5)] == [silent]
    assert state.held_snapshots() == 1
    assert [w.worker_id for w in state.live_workers()] == [alive]
    assert silent not in state.policy.worker_ids()
    with pytest.raises(UnknownWorker, match="join again"):
        state.push(state.admit(silent, torch.ones(NUMEL), base_version=state.version))
    assert state.reap(lease_seconds=5) == [], "a worker heard from within the lease stays"


def test_heartbeat_keeps_a_computing_worker_while_a_silent_one_is_forgotten(servers):
    server = servers("--task", "digits-mlp", "--max-updates", "100", "--lease-seconds", "1.5")
    with WorkerClient(server.address, timeout=10) as busy, WorkerClient(server.address, timeout=10) as silent:
        busy_id, silent_id = busy.join().worker_id, silent.join().worker_id
        _, theta = busy.pull()
        silent.pull()
        with Heartbeat(busy, interval=0.5):
            time.sleep(4.5)  # three leases without a push
        status = busy.status()
        assert [w.worker_id for w in status.workers] == [busy_id] and busy_id != silent_id
        assert status.held_snapshots == 1
        with pytest.raises(grpc.RpcError) as refused:
            silent.push(torch.zeros_like(theta), base_version=0)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        assert f"worker {silent_id} is not registered" in refused.value.details() and "join again" in refused.value.details()
        assert busy.push(torch.zeros_like(theta), base_version=0).applied
