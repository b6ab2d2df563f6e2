"""Poisoned pushes: huge finite gradients are refused and θ stays finite and unchanged by them; a
push's claimed examples are bounded and its loss only counts when finite."""
import math
import os
import signal
import time

import grpc
import pytest
import torch

from gapaware import WorkerClient
from gapaware.processes import start_worker
from gapaware.server.checkpoint import CheckpointDirectory, read_checkpoint, write_checkpoint
from gapaware.server.errors import NonFiniteUpdate, OversizedGradient
from gapaware.server.policies import POLICIES
from gapaware.server.push_bound import NORM_CEILING, WINDOW, NormBound
from gapaware.server.servicer import status_code_for
from tests.inprocess import StateSnapshot, small_state
from tests.test_observability import free_port, scrape
from tests.waiting import wait_for


def test_the_bound_follows_the_median_of_the_recent_accepted_norms():
    bound = NormBound(10.0)
    assert bound.limit() == NORM_CEILING, "before WINDOW pushes only the ceiling applies"
    with pytest.raises(OversizedGradient, match="overflows float32"):
        bound.check(1e30)
    for norm in [1.0] * (WINDOW - 1):
        bound.accepted(norm)
    bound.check(1e6)
    bound.accepted(3.0)
    assert bound.limit() == 10.0
    bound.check(10.0)
    with pytest.raises(OversizedGradient, match=r"exceeds the bound 10 \(10 x 1"):
        bound.check(10.5)
    bound.accepted(0.0)
    assert bound.recent()[-1] == 3.0, "a zero norm is not counted: it would pull the median to 0"
    for _ in range(WINDOW // 2 + 1):
        bound.accepted(2.0)
    assert bound.limit() == 20.0, "the bound moves with the norms of training"
    with pytest.raises(ValueError, match="positive finite"):
        NormBound(10.0, [1.0, math.inf])
    with pytest.raises(ValueError, match="above 1"):
        NormBound(1.0)


def push(state, worker: int, grad: torch.Tensor, **details):
    return state.push(state.admit(worker, grad, base_version=state.pull(worker)[0], **details))


def test_an_oversized_push_is_refused_before_it_touches_anything_and_training_goes_on():
    state = small_state(100, grad_norm_bound=100.0)
    worker = state.join("h", "cpu", None).worker_id
    gen = torch.Generator().manual_seed(0)
    for _ in range(WINDOW):
        push(state, worker, torch.randn(100, generator=gen) * 0.1)
    limit = state.grad_norm_limit()
    assert 0 < limit < NORM_CEILING
    before = StateSnapshot.of(state)
    attack = torch.full((100,), 2 * limit / 10)   # norm 2 x the limit: far below the ceiling
    for grad in (attack, torch.full((100,), 1e30), torch.zeros(100).index_fill_(0, torch.tensor([0]), 3e38)):
        with pytest.raises(OversizedGradient) as refused:
            push(state, worker, grad)
        assert status_code_for(refused.value) == grpc.StatusCode.FAILED_PRECONDITION
    StateSnapshot.of(state).assert_same(before)
    assert state.updater.oversized_pushes == 3 and state.grad_norm_limit() == limit
    assert push(state, worker, torch.randn(100, generator=gen) * 0.1).applied


def test_a_resumed_run_is_bounded_from_its_first_push(tmp_path):
    state = small_state(100, grad_norm_bound=100.0)
    worker = state.join("h", "cpu", None).worker_id
    gen = torch.Generator().manual_seed(0)
    for _ in range(WINDOW + 5):
        push(state, worker, torch.randn(100, generator=gen) * 0.1)
    saved = read_checkpoint(write_checkpoint(tmp_path, state.checkpoint()))
    assert list(saved.push_norms) == state.updater.bound.recent()
    resumed = small_state(100, grad_norm_bound=100.0)
    resumed.restore(saved, incarnation=1)
    assert resumed.grad_norm_limit() == state.grad_norm_limit() < NORM_CEILING
    worker = resumed.join("h", "cpu", None).worker_id
    with pytest.raises(OversizedGradient):
        push(resumed, worker, torch.full((100,), resumed.grad_norm_limit()))


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_an_update_that_would_make_theta_nonfinite_is_undone(policy):
    """Without the norm bound, pushes of 3e38 overflow θ (through momentum) within a few updates:
    each such update is refused with θ exactly as before it, and θ never holds NaN or Inf."""
    state = small_state(100, policy=policy, momentum=0.9)
    worker = state.join("h", "cpu", None).worker_id
    refused = 0
    for _ in range(4):
        before = StateSnapshot.of(state)
        try:
            push(state, worker, torch.full((100,), 3e38))
        except NonFiniteUpdate as error:
            refused += 1
            assert "left as they were" in str(error)
            assert status_code_for(error) == grpc.StatusCode.FAILED_PRECONDITION
            version, theta = state.parameters()
            assert version == before.version and torch.equal(theta, before.theta)
        assert torch.isfinite(state.theta).all()
    assert refused >= 1 and state.updater.nonfinite_updates == refused


def test_skip_drops_an_update_with_a_nonfinite_result_and_apply_keeps_it():
    skipping = small_state(100, policy="asgd", nonfinite="skip")
    worker = skipping.join("h", "cpu", None).worker_id
    results = [push(skipping, worker, torch.full((100,), 3e38)) for _ in range(3)]
    assert not all(r.applied for r in results) and torch.isfinite(skipping.theta).all()
    applying = small_state(100, policy="asgd", nonfinite="apply")
    worker = applying.join("h", "cpu", None).worker_id
    assert all(push(applying, worker, torch.full((100,), 3e38)).applied for _ in range(3))
    assert not torch.isfinite(applying.theta).all(), "--nonfinite apply applies what the arithmetic gives"


def test_a_push_claiming_more_examples_than_the_training_set_is_refused_at_the_door(inprocess_servers):
    state = small_state(100)
    server = inprocess_servers(state)
    with WorkerClient(server.address, timeout=10) as client:
        client.join()
        version, theta = client.pull()
        before = StateSnapshot.of(state)
        with pytest.raises(grpc.RpcError) as refused:
            client.push(torch.zeros_like(theta), version, samples=2**32 - 1)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "claims 4294967295 examples; one push may hold at most 1000" in refused.value.details()
        StateSnapshot.of(state).assert_same(before)
        assert client.push(torch.zeros_like(theta), version, samples=1000).applied
        assert client.status().epoch == 1.0


def test_nonfinite_losses_are_left_out_of_the_training_loss():
    state = small_state(100)
    worker = state.join("h", "cpu", None).worker_id
    for loss in (0.5, math.nan, math.inf, 1.5, -math.inf):
        assert push(state, worker, torch.zeros(100), loss=loss).applied
    window = state.take_window()
    assert window["train_loss"] == 1.0
    assert state.totals()["run_train_loss"] == 1.0 and state.totals()["pushes"] == 5


def honest_pushes(status, worker_id: int) -> int:
    return next((w.pushes for w in status.workers if w.worker_id == worker_id), 0)


@pytest.mark.slow
def test_a_real_server_refuses_huge_gradients_and_its_real_worker_keeps_training(servers, tmp_path):
    metrics_port = free_port()
    checkpoints = tmp_path / "ckpt"
    server = servers("--task", "digits-mlp", "--max-updates", "1000000", "--eval-every", "1000000",
                     "--checkpoint-dir", str(checkpoints), "--checkpoint-every", "0", "--checkpoint-seconds", "0",
                     "--metrics-port", str(metrics_port))
    worker = start_worker(server.address, tmp_path, 0)
    try:
        with WorkerClient(server.address, timeout=30) as attacker:
            attacker.join()
            status = wait_for(lambda: (s := attacker.status()).version >= 2 * WINDOW and s, 120, "the warm-up")
            honest_id = next(w.worker_id for w in status.workers if w.worker_id != attacker.info.worker_id)
            limit = status.grad_norm_limit
            assert 0 < limit < 1e3, limit
            numel = attacker.info.layout.numel
            relative = torch.full((numel,), 3 * limit / math.sqrt(numel))   # 3 x the bound, far below the ceiling
            attacks = [torch.zeros(numel).index_fill_(0, torch.tensor([0]), 3e38), torch.full((numel,), 1e30),
                       relative]

            def attack() -> None:
                for grad in attacks:
                    version, _ = attacker.pull()
                    with pytest.raises(grpc.RpcError) as refused:
                        attacker.push(grad, version)
                    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                    assert "gradient norm" in refused.value.details()

            # The honest worker stopped: θ is bit for bit what it was.
            os.kill(worker.pid, signal.SIGSTOP)
            try:
                still = wait_for(lambda: _unchanged_for(attacker, 1.0), 30, "the stopped worker's last push")
                before_version, before_theta = attacker.pull()
                assert before_version == still
                attack()
                after_version, after_theta = attacker.pull()
                assert after_version == before_version and torch.equal(after_theta, before_theta)
            finally:
                os.kill(worker.pid, signal.SIGCONT)

            # The honest worker running: its pushes keep being applied, the attacker's never are.
            before = attacker.status()
            for _ in range(3):
                attack()
            wait_for(lambda: honest_pushes(attacker.status(), honest_id) >= honest_pushes(before, honest_id) + 50, 30,
                     "the honest worker's pushes")
            after = attacker.status()
            assert after.version - before.version == honest_pushes(after, honest_id) - honest_pushes(before, honest_id)
            assert honest_pushes(after, attacker.info.worker_id) == 0
            assert after.oversized_pushes == 4 * len(attacks) and after.nonfinite_updates == 0
            assert scrape(metrics_port)[("gapaware_pushes_rejected_total", (("reason", "oversized_gradient"),))] == 12
            attacker.leave()
        assert worker.poll() is None, "the honest worker is still training"
        server.proc.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        assert worker.wait(timeout=60) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
    newest = read_checkpoint(CheckpointDirectory(checkpoints).paths()[-1])  # refuses a non-finite θ
    assert newest.version >= after.version and torch.isfinite(newest.theta).all()


def _unchanged_for(client: WorkerClient, seconds: float) -> int | None:
    """The server's version if it did not change for ``seconds``, else None."""
    version = client.status().version
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if client.status().version != version:
            return None
        time.sleep(0.05)
    return version
