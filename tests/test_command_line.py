"""gapaware/command_line.py: the flags it builds are the ones the CLI parses back into the same settings."""
import shlex

import pytest
from click.testing import CliRunner

from gapaware.cli import config_from_options, main
from gapaware.command_line import config_flags, flags
from gapaware.common.config import RunConfig
from gapaware.simulator.command import command_line
from gapaware.simulator.runner import SimulationSettings
from tests.invocations import parse_invocation


def test_flags_spell_out_each_kind_of_value():
    assert flags({"max_updates": 10, "nesterov": False, "heterogeneous": True, "decay_at": (0.5, 0.75),
                  "data_dir": None, "receive-window": 1, "lr": 1e-8}) == [
        "--max-updates", "10", "--no-nesterov", "--heterogeneous", "--decay-at", "0.5,0.75", "--receive-window", "1",
        "--lr", "1e-08"]


@pytest.mark.parametrize("config", [
    RunConfig(task="digits-mlp", max_updates=20),
    RunConfig(policy="dana-ga", nesterov=True, lr=0.1, ga_eps=1e-10, decay_at=(0.3,), epochs=2.5,
              snapshot_dtype="bfloat16", data_dir="/data"),
    RunConfig(schedule="cosine", warmup_updates=5, weight_decay=5e-4, max_updates=100, epochs=1.0, seed=7),
])
def test_a_config_survives_its_flags(config):
    assert config_from_options(dict(parse_invocation(["server", *config_flags(config)])[1])) == config


def test_a_simulation_command_line_reproduces_its_settings():
    settings = SimulationSettings(task="digits-mlp", data_dir="/my data", lr=0.1, epochs=2.5, heterogeneous=True)
    words = shlex.split(command_line(settings, policies=("gap-aware", "ssgd"), workers=(1, 4), seeds=2))
    assert words[:2] == ["gapaware", "simulate"]
    params = parse_invocation(words[1:])[1]
    assert SimulationSettings(**{name: params[name] for name in vars(settings)}) == settings
    assert (params["policies"], params["workers"], params["seeds"]) == (("gap-aware", "ssgd"), (1, 4), 2)


def test_worker_procs_start_children_with_the_parents_flags_and_their_own_device(monkeypatch):
    argvs = []
    monkeypatch.setattr("gapaware.worker.procs.run_worker_processes",
                        lambda count, argv_for: argvs.extend(argv_for(i) for i in range(count)) or 0)
    given = ["--server", "head:7070", "--batch-size", "16", "--prefetch-batches", "0", "--rpc-timeout", "5.5",
             "--transport-dtype", "bfloat16"]
    result = CliRunner().invoke(main, ["worker", *given, "--procs", "2", "--device", "cuda:{i}"])
    assert result.exit_code == 0, result.output
    parent = parse_invocation(["worker", *given])[1]
    assert [parse_invocation(argv)[1] for argv in argvs] == [{**parent, "device": "cuda:0"},
                                                            {**parent, "device": "cuda:1"}]
