"""A policy behaves the same simulated or deployed: the simulator's event loop driven through a real
``gapaware server`` process over gRPC ends on exactly the parameters it reaches in-process.

Both runs use the same event order (the same seeded worker clocks), the same gradients (the
simulator's own :class:`GradientSource`, computed on whatever each master returned at the pull)
and the same run configuration. The comparison is bit-exact (``torch.equal``), not a tolerance:
float32 tensors cross the wire as raw bytes, and the server applies the same policy code to the
same float32 values in the same order, so any difference at all means the two paths diverged.
"""
import math

import pytest
import torch

from gapaware import WorkerClient
from gapaware.command_line import config_flags
from gapaware.common.layout import ParamLayout
from gapaware.common.registry import SYNCHRONOUS_SGD
from gapaware.common.tasks import load_task
from gapaware.server.build import build_state
from gapaware.simulator.clock import WorkerClocks
from gapaware.simulator.gradients import GradientSource
from gapaware.simulator.master import LocalMaster
from gapaware.simulator.runner import RunSpec, SimulationSettings, run_async, run_config, run_sync

WORKERS = 4
SETTINGS = SimulationSettings(task="digits-mlp", epochs=1.0)  # 45 updates (23 rounds of SSGD at N=2)


class GrpcMaster:
    """The simulator's Master protocol over gRPC: one real client (one server worker id) per virtual worker."""

    def __init__(self, address: str, workers: int, layout: ParamLayout) -> None:
        self.clients = [WorkerClient(address, timeout=30) for _ in range(workers)]
        for client in self.clients:
            client.join(layout)

    def pull(self, worker: int):
        return self.clients[worker].pull()

    def push(self, worker: int, grad, *, base_version: int, samples: int = 0, loss: float = math.nan):
        return self.clients[worker].push(grad, base_version, samples=samples, loss=loss)

    def close(self) -> None:
        for client in self.clients:
            client.leave()
            client.close()


def drive(master, spec: RunSpec, config, max_updates: int) -> list:
    """Run the simulator's loop for ``spec`` against ``master``; the push results it saw."""
    task = load_task(config.task, seed=config.seed)
    gradients = GradientSource(task, workers=spec.workers, batch_size=SETTINGS.batch_size, seed=spec.seed)
    clocks = WorkerClocks(spec.workers, seed=spec.seed, shape=SETTINGS.gamma_shape)
    seen = []
    loop = run_sync if spec.policy == SYNCHRONOUS_SGD else run_async
    limit = {"max_rounds" if spec.policy == SYNCHRONOUS_SGD else "max_pushes": max_updates}
    loop(master, gradients, clocks, batch_size=SETTINGS.batch_size, on_update=lambda r, now: seen.append(r),
         **limit)
    return seen


@pytest.mark.parametrize("policy, workers", [
    ("gap-aware", WORKERS),   # θ⁽ⁱ⁾ snapshots, GA statistics, the master's momentum
    ("dana-ga", WORKERS),     # per-worker buffers keyed by worker id, look-ahead pulls
    ("nag-asgd", WORKERS),    # the server's asgd with Nesterov momentum
    (SYNCHRONOUS_SGD, 2),     # averaged gradients as one fresh push, batch of N × 32 in the schedule
])
def test_simulator_and_real_server_reach_identical_parameters(servers, policy, workers):
    spec = RunSpec(policy, workers, seed=3)
    config = run_config(SETTINGS, spec)
    task, state = build_state(config)
    local_master = LocalMaster(state, workers)
    local = drive(local_master, spec, config, state.total_updates)
    _, local_theta = local_master.pull(0)  # what a worker is sent: θ, or DANA's look-ahead from θ and Σvʲ

    server = servers(*config_flags(config))
    remote = GrpcMaster(server.address, workers, ParamLayout.from_module(task.model))
    try:
        over_grpc = drive(remote, spec, config, state.total_updates)
        _, server_theta = remote.pull(0)
    finally:
        remote.close()
    assert server.wait(timeout=60) == 0, server.log()

    assert len(local) == state.total_updates and local[-1].finished
    if policy != SYNCHRONOUS_SGD:
        assert max(r.staleness for r in local) >= workers - 1, "the events must include stale pushes"
    assert [(r.version, r.staleness, r.finished) for r in over_grpc] == \
        [(r.version, r.staleness, r.finished) for r in local]
    assert [r.mean_gap for r in over_grpc] == pytest.approx([r.mean_gap for r in local], rel=1e-6)
    assert not torch.equal(local_theta, build_state(config)[1].theta), "training must move the parameters"
    assert torch.equal(server_theta, local_theta)
