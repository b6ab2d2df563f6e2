"""Every flag has a GAPAWARE_… environment variable; the command line wins over it."""
import click
import pytest
from click.testing import CliRunner

from gapaware.cli import main
from tests.invocations import parse_invocation


def options_of(name: str) -> list[click.Option]:
    return [p for p in main.commands[name].params if isinstance(p, click.Option) and not p.is_eager]


def parse(args: list[str], env: dict[str, str]) -> dict:
    return parse_invocation(args, env)[1]


@pytest.mark.parametrize("command", sorted(main.commands))
def test_every_option_has_its_own_variable_shown_in_help(command):
    options = options_of(command)
    variables = [o.envvar for o in options]
    assert all(isinstance(v, str) and v.startswith("GAPAWARE_") for v in variables), variables
    assert len(set(variables)) == len(variables)
    help_text = " ".join(CliRunner().invoke(main, [command, "--help"]).output.split())
    assert all(f"env var: {v}" in help_text for v in variables)


def test_the_variable_is_named_after_the_flag_and_means_the_same_in_every_command():
    by_flag = {}
    for command in main.commands:
        for option in options_of(command):
            flag = max(option.opts, key=len)
            by_flag.setdefault(flag, set()).add(option.envvar)
    assert by_flag["--metrics-port"] == {"GAPAWARE_METRICS_PORT"}
    assert by_flag["--server"] == {"GAPAWARE_SERVER"}, "worker, status and health read the same variable"
    assert all(len(names) == 1 for names in by_flag.values()), by_flag


def test_variables_configure_a_command_and_flags_override_them():
    env = {"GAPAWARE_PORT": "7171", "GAPAWARE_POLICY": "dana", "GAPAWARE_NESTEROV": "true",
           "GAPAWARE_DECAY_AT": "0.3,0.6", "GAPAWARE_METRICS_PORT": "9191"}
    params = parse(["server"], env)
    assert (params["port"], params["policy"], params["nesterov"], params["decay_at"], params["metrics_port"]) == \
        (7171, "dana", True, (0.3, 0.6), 9191)
    assert parse(["server", "--port", "7272", "--no-nesterov"], env)["port"] == 7272
    assert parse(["server", "--no-nesterov"], env)["nesterov"] is False
    worker = parse(["worker"], {"GAPAWARE_SERVER": "head:7070", "GAPAWARE_DEVICE": "cuda:1"})
    assert (worker["address"], worker["device"]) == ("head:7070", "cuda:1")


def test_a_bad_value_in_a_variable_names_the_variable(monkeypatch):
    monkeypatch.setenv("GAPAWARE_PORT", "seventy")
    result = CliRunner().invoke(main, ["server"])
    assert result.exit_code == 2
    assert "Invalid value for '--port' (env var: 'GAPAWARE_PORT')" in result.output
