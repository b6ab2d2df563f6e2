"""Parameter groups: frozen parameters neither travel nor move, weight decay skips what it is told
to, learning-rate multipliers scale steps, in every policy alike (docs/ALGORITHMS.md#per-parameter-settings)."""
from __future__ import annotations

import shlex

import pytest
import torch
from torch import nn

from gapaware.common.config import RunConfig
from gapaware.common.layout import ParamLayout, flat_parameters
from gapaware.common.tasks import TaskError, load_task
from gapaware.export import model_state
from gapaware.server.build import build_state
from gapaware.server.observability import ServerMetrics
from gapaware.server.policies import POLICIES, ElementRates, element_rates, make_policy
from gapaware.server.state import ParameterServerState
from gapaware.simulator.command import command_line
from gapaware.simulator.runner import RunSpec, SimulationSettings, simulate_run
from gapaware.worker.loop import WorkerOptions, run_worker
from tests.inprocess import InProcessServer
from tests.invocations import parse_invocation

FROZEN_TASK = "tests.group_tasks:frozen"


def train_in_process(config: RunConfig, **worker_options) -> tuple[ParameterServerState, ServerMetrics, object]:
    """A real gRPC server in this process and one real worker loop run to the end of ``config``'s run."""
    task, state = build_state(config, grad_norm_bound=0.0)
    metrics = ServerMetrics(state)
    server = InProcessServer(state, metrics=metrics)
    try:
        run_worker(WorkerOptions(server=server.address, progress_every=0, prefetch_batches=0, **worker_options))
    finally:
        server.close()
    return state, metrics, task


def test_a_frozen_layer_is_not_sent_and_does_not_move_under_weight_decay():
    config = RunConfig(task=FROZEN_TASK, policy="asgd", lr=0.1, momentum=0.9, weight_decay=0.05,
                       schedule="constant", max_updates=40, batch_size=16)
    state, metrics, task = train_in_process(config)
    fresh = load_task(FROZEN_TASK).model
    trainable = 32 * 3 + 3
    assert state.layout.numel == trainable and [b.name for b in state.layout.frozen] == ["0.weight", "0.bias"]
    assert state.version == 40
    pushes = metrics.registry.get_sample_value("gapaware_pushes_accepted_total")
    received = metrics.registry.get_sample_value("gapaware_received_bytes_total")
    assert pushes == 40 and received == pushes * trainable * 4, "each push carries the trainable float32s only"
    assert not torch.equal(state.theta, flat_parameters(fresh)), "the trainable layer trained"
    exported = model_state(state.checkpoint())
    assert set(exported) == set(fresh.state_dict()), "the export holds the frozen layer too"
    for name in ("0.weight", "0.bias"):
        assert torch.equal(exported[name], fresh.state_dict()[name]), f"{name} moved"
        assert torch.equal(dict(task.model.named_parameters())[name], fresh.state_dict()[name])
    assert torch.equal(exported["2.weight"].reshape(-1), state.theta[:96])


def test_a_worker_whose_frozen_values_differ_is_refused():
    server_layout = ParamLayout.from_module(load_task(FROZEN_TASK).model)
    other = load_task(FROZEN_TASK).model
    with torch.no_grad():
        other[0].weight[0, 0] += 1
    mismatch = server_layout.describe_mismatch(ParamLayout.from_module(other))
    assert mismatch is not None and "frozen parameters" in mismatch and "other values" in mismatch
    assert ParamLayout.from_proto(server_layout.to_proto()) == server_layout


def _state(model: nn.Module, **config) -> ParameterServerState:
    layout = ParamLayout.from_module(model)
    return ParameterServerState(RunConfig(schedule="constant", max_updates=100, **config), layout,
                                flat_parameters(model), train_size=100)


def _push(state: ParameterServerState, grad: torch.Tensor) -> None:
    worker = state.join("test", "cpu", None).worker_id
    version, _ = state.pull(worker)
    state.push(state.admit(worker, grad, base_version=version))


def test_weight_decay_skips_biases_and_norm_weights_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))  # 0.weight [4], 0.bias [2], 1.weight [2], 1.bias [2]
    theta = flat_parameters(model)
    grad = torch.linspace(-1, 1, 10)
    lr, decay = 0.5, 0.2
    state = _state(model, policy="asgd", momentum=0.0, lr=lr, weight_decay=decay, weight_decay_skip_bias_norm=True)
    _push(state, grad)
    expected = theta - lr * grad
    expected[:4] = theta[:4] - lr * (grad[:4] + decay * theta[:4])  # only the 2-D weight decays
    assert torch.allclose(state.theta, expected, atol=1e-7, rtol=0)
    by_name = _state(model, policy="asgd", momentum=0.0, lr=lr, weight_decay=decay, no_weight_decay=("0.*",))
    _push(by_name, grad)
    expected = theta - lr * grad
    expected[6:] = theta[6:] - lr * (grad[6:] + decay * theta[6:])  # 0.weight and 0.bias excluded by name
    assert torch.allclose(by_name.theta, expected, atol=1e-7, rtol=0)


def test_learning_rate_multipliers_by_hand_with_momentum():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))  # 0.*: 6 elements, 1.weight 2, 1.bias 1
    theta = flat_parameters(model)
    g1, g2 = torch.linspace(-1, 1, 9), torch.linspace(1, 2, 9)
    lr, mu = 0.1, 0.5
    state = _state(model, policy="asgd", momentum=mu, lr=lr, lr_scale=(("1.*", 10.0), ("*", 0.5)))
    _push(state, g1)
    _push(state, g2)
    r = torch.tensor([0.5] * 6 + [10.0] * 3)
    buffer = g1.clone()
    expected = theta - lr * r * buffer
    buffer = mu * buffer + g2
    expected = expected - lr * r * buffer
    assert torch.allclose(state.theta, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_groups_are_each_elements_own_settings_in_every_policy(name):
    """Every policy is element-wise: with groups, each element moves exactly as the same policy without
    groups moves it at its own λ_j and η·r_j (GA's C and DANA's look-ahead scale with r too)."""
    numel, half = 64, 32
    generator = torch.Generator().manual_seed(1)
    theta0 = torch.randn(numel, generator=generator)
    grads = [torch.randn(numel, generator=generator) for _ in range(6)]
    lr, decays, scales = 0.05, (0.1, 0.0), (2.0, 0.25)
    per_element = ElementRates(torch.cat([torch.full((half,), d) for d in decays]),
                               torch.cat([torch.full((half,), r) for r in scales]))

    def run(policy, lr_used):
        theta = theta0.clone()
        pulled = {worker: policy.pull_view(theta, lr=lr_used, worker_id=worker) for worker in (0, 1)}
        for step, grad in enumerate(grads):  # two workers in turn: every push one update stale
            worker = step % 2
            policy.apply(theta, grad, lr=lr_used, staleness=min(step, 1), worker_id=worker,
                         stale_theta=pulled[worker] if policy.needs_snapshot else None)
            pulled[worker] = policy.pull_view(theta, lr=lr_used, worker_id=worker)
        return theta, pulled[0]

    grouped, grouped_view = run(make_policy(name, numel, momentum=0.9, weight_decay=0.1, rates=per_element), lr)
    for part, decay, scale in zip((slice(0, half), slice(half, numel)), decays, scales):
        alone, alone_view = run(make_policy(name, numel, momentum=0.9, weight_decay=decay), lr * scale)
        assert torch.allclose(grouped[part], alone[part], atol=1e-6, rtol=1e-5), name
        assert torch.allclose(grouped_view[part], alone_view[part], atol=1e-6, rtol=1e-5), name


def test_a_pattern_that_matches_no_trainable_parameter_is_refused():
    layout = ParamLayout.from_module(load_task(FROZEN_TASK).model)
    with pytest.raises(ValueError, match=r"--no-weight-decay 'head\.\*' matches no trainable parameter.*2\.weight"):
        element_rates(layout, RunConfig(task=FROZEN_TASK, max_updates=1, weight_decay=0.1, no_weight_decay=("head.*",)))
    with pytest.raises(ValueError, match="only frozen parameters"):
        element_rates(layout, RunConfig(task=FROZEN_TASK, max_updates=1, lr_scale=(("0.*", 2.0),)))
    with pytest.raises(ValueError, match="factor > 0"):
        RunConfig(max_updates=1, lr_scale=(("*", 0.0),))
    uniform = element_rates(layout, RunConfig(max_updates=1, weight_decay=0.1, lr_scale=(("*", 1.0),)))
    assert uniform.weight_decay == 0.1 and uniform.lr_scale is None, "no tensors where every element is alike"


def test_the_server_refuses_a_pattern_that_fits_no_parameter_before_it_starts():
    """A TaskError: the command line reports it in one line and exits CANNOT_RUN (4), as for any task error."""
    config = RunConfig(task=FROZEN_TASK, max_updates=1, weight_decay=0.1, no_weight_decay=("head.*",))
    with pytest.raises(TaskError, match=r"--no-weight-decay 'head\.\*' matches no trainable parameter"):
        build_state(config)


def test_the_simulator_applies_parameter_groups_and_its_command_line_keeps_them():
    fast = dict(task="digits-mlp", epochs=0.2, eval_points=1, lr=0.05, momentum=0.9)
    plain = simulate_run(SimulationSettings(**fast), RunSpec("gap-aware", 2, seed=0)).curve
    decayed = simulate_run(SimulationSettings(**fast, weight_decay=0.5), RunSpec("gap-aware", 2, seed=0)).curve
    excluded = SimulationSettings(**fast, weight_decay=0.5, no_weight_decay=("*",))
    assert decayed != plain
    assert simulate_run(excluded, RunSpec("gap-aware", 2, seed=0)).curve == plain  # every parameter excluded

    settings = SimulationSettings(**fast, no_weight_decay=("*.bias", "0.*"), weight_decay_skip_bias_norm=True,
                                  lr_scale=(("2.*", 0.5),))
    params = parse_invocation(shlex.split(command_line(settings, policies=("gap-aware",), workers=(2,), seeds=1))[1:])[1]
    assert SimulationSettings(**{name: params[name] for name in vars(settings)}) == settings
