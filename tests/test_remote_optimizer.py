"""gapaware.RemoteOptimizer against a real in-process server: each step is the server's update, and the
usual companions of an optimizer (GradScaler, clip_grad_norm_, accumulation) work unchanged."""
from __future__ import annotations

import time

import grpc
import pytest
import torch
from torch import nn

import gapaware
from gapaware.common.buffers import model_buffers
from gapaware.common.config import RunConfig
from gapaware.common.layout import ParamLayout, flat_gradients, flat_parameters
from gapaware.common.registry import FROM_WORKER
from gapaware.common.security import ServerSecurity
from gapaware.common.shards import Shard
from gapaware.common.tasks import load_task
from gapaware.server.app import ServerOptions
from gapaware.server.build import build_state, state_from_model
from gapaware.worker.remote_optimizer import LocalScheduleRefused

LR = 0.1
LEASE = 2.0
TOKEN = "5ec0d5ec0d5ec0d5ec0d5ec0d5ec0d5e"


def bn_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def plain_sgd_state(model: nn.Module, max_updates: int = 1000):
    """A server for ``model`` whose update is θ ← θ − η·g exactly (ASGD, no momentum, constant η)."""
    config = RunConfig(task=FROM_WORKER, policy="asgd", lr=LR, momentum=0.0, schedule="constant",
                       max_updates=max_updates, batch_size=16)
    layout = ParamLayout.from_module(model)
    return state_from_model(config, layout, flat_parameters(model), model_buffers(model, layout.buffers))


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(16, 8, generator=generator) + 3.0, torch.randint(0, 3, (16,), generator=generator)


def backward(model: nn.Module, seed: int, scale: float = 1.0) -> torch.Tensor:
    inputs, targets = batch(seed)
    loss = nn.functional.cross_entropy(model(inputs), targets)
    (loss * scale).backward()
    return loss


@pytest.fixture
def served(inprocess_servers):
    def serve(model: nn.Module, **kwargs):
        server = inprocess_servers(plain_sgd_state(model, **kwargs))
        return server.state, server.address
    return serve


def test_a_step_is_the_servers_update_and_loads_its_parameters_and_buffers(served):
    model = bn_model()
    state, address = served(bn_model(seed=1))  # the server's model: the optimizer loads it at once
    with gapaware.RemoteOptimizer(model, server=address) as optimizer:
        assert torch.equal(flat_parameters(model), state.theta)
        before = state.theta.clone()
        optimizer.zero_grad()
        backward(model, seed=0)
        grad = flat_gradients(model)
        optimizer.step()
        assert state.version == 1 and optimizer.steps == 1
        torch.testing.assert_close(state.theta, before - LR * grad)
        assert torch.equal(flat_parameters(model), state.theta)
        # The worker's BatchNorm statistics after the batch are the server's, and came back with θ.
        assert torch.equal(state.buffer_tensors()["1.running_mean"], model[1].running_mean)
        assert model[1].num_batches_tracked.item() == 1


def test_grad_scaler_and_clipping_work_unchanged(served):
    model = bn_model()
    state, address = served(model)
    optimizer = gapaware.RemoteOptimizer(model, server=address)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    before = state.theta.clone()
    optimizer.zero_grad()
    scaler.scale(nn.functional.cross_entropy(model(batch(0)[0]), batch(0)[1])).backward()
    scaler.unscale_(optimizer)
    norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05)
    clipped = flat_gradients(model)
    scaler.step(optimizer)
    scaler.update()
    assert norm > 0.05 and clipped.norm().item() == pytest.approx(0.05, rel=1e-4)
    torch.testing.assert_close(state.theta, before - LR * clipped)
    optimizer.close()


def test_a_non_finite_gradient_is_skipped_here_counted_and_never_sent(served):
    model = bn_model()
    state, address = served(model)
    optimizer = gapaware.RemoteOptimizer(model, server=address)
    before = flat_parameters(model)
    backward(model, seed=0)
    model[0].weight.grad[0, 0] = float("nan")
    optimizer.step()
    assert (optimizer.skipped_steps, optimizer.steps, state.version, state.updater.nonfinite_pushes) == (1, 0, 0, 0)
    assert torch.equal(flat_parameters(model), before)
    optimizer.close()


def test_gradient_accumulation_is_a_step_every_k_micro_batches(served):
    model = bn_model()
    state, address = served(model)
    optimizer = gapaware.RemoteOptimizer(model, server=address)
    before = state.theta.clone()
    optimizer.zero_grad()
    for seed in range(3):
        backward(model, seed, scale=1 / 3)
    accumulated = flat_gradients(model)
    optimizer.step()
    assert state.version == 1
    torch.testing.assert_close(state.theta, before - LR * accumulated)
    optimizer.close()


@pytest.mark.parametrize("scheduler", [
    lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, step_size=10),
    lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.5),
])
def test_a_local_learning_rate_scheduler_is_refused_with_the_servers_flags(served, scheduler):
    model = bn_model()
    _, address = served(model)
    with gapaware.RemoteOptimizer(model, server=address) as optimizer:
        with pytest.raises(LocalScheduleRefused, match="--schedule"):
            scheduler(optimizer)
        assert optimizer.param_groups[0]["lr"] == LR


def test_a_forgotten_worker_joins_again_and_goes_on(served):
    model = bn_model()
    state, address = served(model)
    optimizer = gapaware.RemoteOptimizer(model, server=address)
    first_id = optimizer._client.info.worker_id
    backward(model, seed=0)
    optimizer.step()
    state.reap(0.0)  # the lease of every worker expires
    assert not state.live_workers()
    for seed in (1, 2):
        optimizer.zero_grad()
        backward(model, seed)
        optimizer.step()
    assert optimizer._client.info.worker_id != first_id
    assert optimizer.steps == 2 and state.version == 2  # the push on the forgotten snapshot was dropped
    assert torch.equal(flat_parameters(model), state.theta)
    optimizer.close()


def test_heartbeats_keep_the_lease_while_a_step_computes(inprocess_servers):
    model = bn_model()
    server = inprocess_servers(plain_sgd_state(model), ServerOptions(lease_seconds=LEASE))
    with gapaware.RemoteOptimizer(model, server=server.address) as optimizer:
        worker_id = optimizer.info.worker_id
        backward(model, seed=0)
        time.sleep(2.5 * LEASE)  # the user's forward and backward: longer than the lease, without a push
        assert server.state.reap(LEASE) == [], "the lease expired while the step computed"
        optimizer.step()
        assert optimizer.info.worker_id == worker_id and optimizer.steps == 1 and server.state.version == 1


def test_the_token_comes_from_the_environment_as_for_the_command_line(inprocess_servers, monkeypatch):
    model = bn_model()
    server = inprocess_servers(plain_sgd_state(model), ServerOptions(security=ServerSecurity(token=TOKEN)))
    with pytest.raises(grpc.RpcError) as refused:
        gapaware.RemoteOptimizer(model, server=server.address)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED and "set GAPAWARE_TOKEN" in refused.value.details()
    monkeypatch.setenv("GAPAWARE_TOKEN", TOKEN)
    with gapaware.RemoteOptimizer(model, server=server.address) as optimizer:
        backward(model, seed=0)
        optimizer.step()
        assert server.state.version == 1


def test_the_end_of_the_run_is_seen_and_close_leaves(served):
    model = bn_model()
    state, address = served(model, max_updates=3)
    optimizer = gapaware.RemoteOptimizer(model, server=address)
    steps = 0
    while not optimizer.finished:
        optimizer.zero_grad()
        backward(model, seed=steps)
        optimizer.step()
        steps += 1
    assert steps == 3 and state.version == 3 and len(state.live_workers()) == 1
    optimizer.step()  # after the end: nothing happens
    assert state.version == 3
    optimizer.close()
    optimizer.close()
    assert not state.live_workers()


def test_a_model_of_another_layout_is_refused_at_construction(served):
    _, address = served(bn_model())
    with pytest.raises(grpc.RpcError) as refused:
        gapaware.RemoteOptimizer(nn.Linear(8, 3), server=address)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_evaluate_needs_an_interval(served):
    _, address = served(bn_model())
    with pytest.raises(ValueError, match="every="):
        gapaware.RemoteOptimizer(bn_model(), server=address, evaluate=lambda model: {})


def test_it_trains_against_sharded_servers(inprocess_servers):
    config = RunConfig(task="digits-mlp", policy="asgd", lr=LR, momentum=0.0, schedule="constant", max_updates=100)
    shards = [inprocess_servers(build_state(config, shard=Shard(index, 2))[1]) for index in range(2)]
    model = load_task("digits-mlp", seed=config.seed).model
    optimizer = gapaware.RemoteOptimizer(model, server=",".join(server.address for server in shards))
    before = flat_parameters(model)
    inputs = torch.rand(16, 64)
    nn.functional.cross_entropy(model(inputs), torch.randint(0, 10, (16,))).backward()
    grad = flat_gradients(model)
    optimizer.step()
    assembled = torch.cat([server.state.theta for server in shards])
    assert [server.state.version for server in shards] == [1, 1]
    torch.testing.assert_close(assembled, before - LR * grad)
    assert torch.equal(flat_parameters(model), assembled)
    optimizer.close()
