"""common/registry.py is the one list of names and defaults: the modules that give them meaning, the
CLI, RunConfig and the simulator agree with it."""
import dataclasses
import inspect
import subprocess
import sys

import click
import pytest

from gapaware.cli import config_from_options, main
from gapaware.common.codecs import CODECS
from gapaware.common.transport import DTYPE_NAMES, WIRE_DTYPE_NAMES
from gapaware.common.config import RunConfig
from gapaware.common.registry import (
    CODEC_NAMES, DEFAULTS, NESTEROV_ASGD, NONFINITE_ACTIONS, POLICY_NAMES, SCHEDULES, SIMULATED_POLICY_NAMES,
    SNAPSHOT_DTYPES, SYNCHRONOUS_SGD, TASK_NAMES, TRANSPORT_DTYPES, WIRE_DTYPES,
)
from gapaware.common.tasks import BUILTIN_TASKS
from gapaware.server import policies
from gapaware.server.policies import POLICIES
from gapaware.simulator.runner import RunSpec, SimulationSettings, run_config
from gapaware.worker.loop import WorkerOptions
from tests.invocations import parse_invocation


def test_the_server_registers_exactly_the_registry_policies():
    assert tuple(POLICIES) == POLICY_NAMES


def test_builtin_tasks_are_the_registry_tasks():
    assert tuple(BUILTIN_TASKS) == TASK_NAMES


def test_the_codec_carries_exactly_the_registry_transport_dtypes():
    assert tuple(DTYPE_NAMES) == TRANSPORT_DTYPES
    assert tuple(CODECS) == CODEC_NAMES
    assert tuple(WIRE_DTYPE_NAMES) == WIRE_DTYPES


def test_the_simulator_runs_the_server_policies_and_its_own_two_on_the_server_ones():
    assert set(SIMULATED_POLICY_NAMES) == {*POLICY_NAMES, NESTEROV_ASGD, SYNCHRONOUS_SGD}
    for name in SIMULATED_POLICY_NAMES:
        assert run_config(SimulationSettings(), RunSpec(name, 2, seed=0)).policy in POLICY_NAMES


def test_gap_aware_arithmetic_defaults_to_the_registry_beta_and_eps():
    """The policies' own defaults for GA's β and ε are the registry's."""
    settings = policies.PolicySettings()
    assert (settings.ga_beta, settings.ga_eps) == (DEFAULTS.ga_beta, DEFAULTS.ga_eps)
    parameters = inspect.signature(policies.make_policy).parameters
    assert (parameters["ga_beta"].default, parameters["ga_eps"].default) == (DEFAULTS.ga_beta, DEFAULTS.ga_eps)
    assert policies.make_policy("gap-aware", 3).hyperparameters()["ga_beta"] == DEFAULTS.ga_beta


def choices(command: str, name: str) -> tuple[str, ...]:
    option = next(p for p in main.commands[command].params if p.name == name)
    assert isinstance(option.type, click.Choice)
    return tuple(option.type.choices)


@pytest.mark.parametrize("command, option, expected", [
    ("server", "policy", POLICY_NAMES),
    ("train", "policy", POLICY_NAMES),
    ("server", "schedule", SCHEDULES),
    ("server", "snapshot_dtype", SNAPSHOT_DTYPES),
    ("server", "nonfinite", NONFINITE_ACTIONS),
    ("worker", "transport_dtype", TRANSPORT_DTYPES),
    ("worker", "push_dtype", WIRE_DTYPES),
    ("worker", "pull_dtype", WIRE_DTYPES),
    ("simulate", "push_dtype", WIRE_DTYPES),
    ("simulate", "pull_dtype", WIRE_DTYPES),
])
def test_the_cli_offers_exactly_the_registry_choices(command, option, expected):
    assert choices(command, option) == expected


@pytest.mark.parametrize("command", ["server", "train", "simulate"])
def test_the_cli_names_every_builtin_task(command):
    task = next(p for p in main.commands[command].params if p.name == "task")
    assert all(name in task.help for name in TASK_NAMES)


@pytest.mark.parametrize("command", ["server", "train"])
def test_a_run_given_no_flags_is_the_registry_defaults(command):
    config = config_from_options(dict(parse_invocation([command])[1]))
    same_names = {f.name for f in dataclasses.fields(RunConfig)} & {f.name for f in dataclasses.fields(DEFAULTS)}
    assert config == RunConfig(**{name: getattr(DEFAULTS, name) for name in same_names})


def test_a_simulation_given_no_flags_is_the_registry_defaults():
    params = parse_invocation(["simulate"])[1]
    settings = SimulationSettings(**{f.name: params[f.name] for f in dataclasses.fields(SimulationSettings)})
    assert settings == SimulationSettings()
    assert (settings.task, settings.lr, settings.momentum, settings.weight_decay, settings.batch_size) == \
        (DEFAULTS.task, DEFAULTS.lr, DEFAULTS.momentum, DEFAULTS.weight_decay, DEFAULTS.batch_size)
    assert (settings.epochs, settings.gamma_shape, settings.eval_points) == \
        (DEFAULTS.simulated_epochs, DEFAULTS.gamma_shape, DEFAULTS.eval_points)
    assert params["policies"] == SIMULATED_POLICY_NAMES


def test_a_worker_given_no_flags_sends_the_registry_transport_dtype():
    params = parse_invocation(["worker", "--server", "head:7070"])[1]
    assert params["transport_dtype"] == WorkerOptions("head:7070").transport_dtype == DEFAULTS.transport_dtype


def test_the_cli_and_the_registry_load_without_torch():
    probe = "import sys, gapaware.cli, gapaware.common.registry; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
