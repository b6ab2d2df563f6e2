"""Leases: a silent worker is forgotten with its snapshot and per-worker policy state."""
import time

import pytest
import torch

from gapaware.server.errors import UnknownWorker
from tests.test_checkpoint import NUMEL, make_state


@pytest.mark.parametrize("policy", ["gap-aware", "dana-ga"])
def test_reaping_forgets_only_silent_workers_and_frees_their_state(policy):
    state = make_state(policy)
    silent, alive = (state.join("h", "cpu", None).worker_id for _ in range(2))
    for worker in (silent, alive):
        state.push(worker, torch.ones(NUMEL), base_version=state.pull(worker)[0])
        state.pull(worker)
    assert state.held_snapshots() == 2
    state.members.get(silent).last_seen = time.monotonic() - 10
    assert [r.worker_id for r in state.reap(lease_seconds=5)] == [silent]
    assert state.held_snapshots() == 1
    assert [w.worker_id for w in state.live_workers()] == [alive]
    assert silent not in state.policy.worker_ids()
    with pytest.raises(UnknownWorker, match="join again"):
        state.push(silent, torch.ones(NUMEL), base_version=state.version)
    assert state.reap(lease_seconds=5) == [], "a worker heard from within the lease stays"
