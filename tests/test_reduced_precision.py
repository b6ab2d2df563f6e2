"""bfloat16 where it halves bytes: gradients and parameters on the wire, GA's snapshots in the server.

Both change what the arithmetic sees (values rounded to bfloat16), so each has a test that
training still reaches the accuracy float32 reaches."""
import pytest
import torch

from gapaware.common.config import RunConfig
from gapaware.processes import start_worker
from gapaware.server.build import build_state
from gapaware.server.policies import make_policy


def _state(snapshot_dtype: str, policy: str = "gap-aware"):
    return build_state(RunConfig(task="digits-mlp", policy=policy, max_updates=10, snapshot_dtype=snapshot_dtype))[1]


@pytest.mark.parametrize("policy", ["gap-aware", "dana-ga"])
def test_bfloat16_snapshots_take_half_the_memory_and_feed_the_gap_rounded(policy):
    full, half = _state("float32", policy), _state("bfloat16", policy)
    numel = full.layout.numel
    for state in (full, half):
        for _ in range(3):
            state.pull(state.join("host", "cpu", None).worker_id)
    assert full.snapshot_bytes() == 3 * numel * 4
    assert half.snapshot_bytes() == 3 * numel * 2

    # Worker 1 pushes after workers 2 and 3: its Gap is measured against its bfloat16-rounded θ⁽¹⁾.
    reference = make_policy(policy, numel, momentum=0.9)
    theta = half.theta.clone()
    pulled = theta.to(torch.bfloat16).float()  # all three pulled version 0
    for worker in (2, 3, 1):
        grad = torch.randn(numel, generator=torch.Generator().manual_seed(worker)) * 0.1
        expected_gap = reference.apply(theta, grad, lr=half.lr(), staleness=half.version, stale_theta=pulled,
                                       worker_id=worker)
        result = half.push(half.admit(worker, grad, base_version=0, samples=1))
        assert result.mean_gap == pytest.approx(expected_gap, rel=1e-12)
        assert torch.equal(half.theta, theta)
    assert result.mean_gap > 1.0, "the last push was stale: its Gap must exceed 1"


def test_recycled_bfloat16_snapshots_still_feed_each_worker_its_own_rounded_theta():
    """Three workers push and pull in turn, so θ⁽ⁱ⁾ tensors are written, read by an update and
    reused for another worker: every Gap is still measured against what its worker pulled."""
    state = _state("bfloat16")
    numel = state.layout.numel
    reference = make_policy("gap-aware", numel, momentum=0.9)
    theta = state.theta.clone()
    workers = [state.join("host", "cpu", None).worker_id for _ in range(3)]
    pulled = {}
    for worker in workers:
        version, view = state.pull(worker)
        pulled[worker] = version, view.to(torch.bfloat16).float()
    for step in range(9):  # the run ends after 10 updates
        worker = workers[step % 3]
        version, stale_theta = pulled[worker]
        grad = torch.randn(numel, generator=torch.Generator().manual_seed(step)) * 0.1
        expected_gap = reference.apply(theta, grad, lr=state.lr(), staleness=state.version - version,
                                       stale_theta=stale_theta, worker_id=worker)
        assert state.push(state.admit(worker, grad, base_version=version, samples=1)).mean_gap == pytest.approx(expected_gap, rel=1e-12)
        assert torch.equal(state.theta, theta)
        version, view = state.pull(worker)
        pulled[worker] = version, view.to(torch.bfloat16).float()


def _train(servers, tmp_path, server_flags, worker_flags):
    server = servers("--task", "digits-mlp", "--policy", "gap-aware", "--lr", "0.05", "--max-updates", "600",
                     "--eval-every", "300", *server_flags)
    workers = [start_worker(server.address, tmp_path, i, *worker_flags) for i in range(2)]
    assert server.wait(timeout=180) == 0, server.log()
    assert [w.wait(timeout=60) for w in workers] == [0, 0]
    return server.records("final")[-1]


def test_training_converges_with_bfloat16_transport(servers, tmp_path):
    final = _train(servers, tmp_path, [], ["--transport-dtype", "bfloat16"])
    assert final["version"] == 600
    assert final["accuracy"] >= 0.9


def test_training_converges_with_bfloat16_snapshots(servers, tmp_path):
    final = _train(servers, tmp_path, ["--snapshot-dtype", "bfloat16"], [])
    assert final["version"] == 600
    assert final["accuracy"] >= 0.9
    assert final["run_mean_gap"] > 1.0, "two concurrent workers make stale pushes whose Gap exceeds 1"
