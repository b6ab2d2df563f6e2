"""The mistakes a person makes running gapaware end in one line that says what to change, and an exit
code that says which kind of mistake (gapaware/cli_errors.py); a bug keeps its whole traceback.

Every case runs the real command line in a process of its own, against a real server that requires a
token; the cases run side by side (each one starts Python and torch, which takes seconds).
"""
from __future__ import annotations

import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import torch

from gapaware.cli_errors import ExitCode
from gapaware.command_line import gapaware_command
from gapaware.processes import ServerProcess

TOKEN = "0123456789abcdef0123456789abcdef"
MOST_LINES = 4
"""A one-line error, after at most the worker's "connecting" and "loading" log lines and a warning."""

BROKEN_TASK = """
import a_package_that_is_not_installed  # the user's module needs a package this machine lacks
"""
TINY_TASKS = """
import torch
from torch import nn
from gapaware import Task


def buggy_loss(outputs, targets):
    return 1 / 0  # the user's bug


def task(width=8, loss=nn.functional.cross_entropy):
    data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    return Task(model=nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 2)), loss=loss,
                train=data, test=data)


def server_model():
    return task()


def other_model():
    return task(width=16)


def buggy():
    return task(loss=buggy_loss)
"""


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]
    token: str | None = TOKEN


def _wrong_device() -> tuple[str, str]:
    """A GPU this process cannot use, and what the error says about it."""
    if torch.version.cuda is None:
        return "cuda:0", f"but this torch ({torch.__version__}) is a CPU-only build: install a CUDA build of torch"
    count = torch.cuda.device_count()
    return f"cuda:{count}", f"but this process sees {count} GPU"


WRONG_DEVICE, WRONG_DEVICE_SAYS = _wrong_device()

CASES = {
    "wrong token": Case(("worker",), token="not-the-token"),
    "no token": Case(("worker",), token=None),
    "wrong model": Case(("worker", "--task", "tiny_tasks:other_model")),
    "unknown task": Case(("worker", "--task", "digits-resnet")),
    "module that does not import": Case(("worker", "--task", "broken_task:factory")),
    "server with a module that does not import": Case(("server", "--task", "broken_task:factory", "--port", "0")),
    "GPU not there": Case(("worker", "--device", WRONG_DEVICE)),
    "debug shows the traceback": Case(("worker", "--task", "digits-resnet", "--log-level", "debug")),
    "a bug in the user's task": Case(("worker", "--task", "tiny_tasks:buggy")),
}


def pythonpath(directory) -> str:
    return os.pathsep.join([str(directory), *filter(None, [os.environ.get("PYTHONPATH")])])


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Each case's finished process: its exit code, and its stdout and stderr as one text in ``stdout``."""
    workdir = tmp_path_factory.mktemp("user-errors")
    (workdir / "broken_task.py").write_text(BROKEN_TASK)
    (workdir / "tiny_tasks.py").write_text(TINY_TASKS)
    server = ServerProcess(workdir, "--task", "tiny_tasks:server_model", "--max-updates", "100000",
                           env={"GAPAWARE_TOKEN": TOKEN, "PYTHONPATH": pythonpath(workdir)})

    def run(case: Case) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GAPAWARE_")}
        env.update(PYTHONPATH=pythonpath(workdir),
                   GAPAWARE_SERVER=server.address, **({"GAPAWARE_TOKEN": case.token} if case.token else {}))
        return subprocess.run(gapaware_command(*case.args), env=env, cwd=workdir, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=240)

    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            return dict(zip(CASES, pool.map(run, CASES.values())))
    finally:
        server.kill()


@pytest.mark.parametrize(("name", "code", "says"), [
    ("wrong token", ExitCode.REFUSED,
     "Error: the server refused: UNAUTHENTICATED: wrong token: the client's GAPAWARE_TOKEN or --token-file differs"),
    ("no token", ExitCode.REFUSED, "Error: the server refused: UNAUTHENTICATED: this server requires a token: set "
                                   "GAPAWARE_TOKEN or give --token-file on the client"),
    ("wrong model", ExitCode.REFUSED, "Error: the server refused: FAILED_PRECONDITION: the worker's model does not "
                                      "match the server's (task 'tiny_tasks:server_model')"),
    ("unknown task", ExitCode.CANNOT_RUN, "Error: unknown task 'digits-resnet': use one of"),
    ("module that does not import", ExitCode.CANNOT_RUN,
     "Error: module 'broken_task' imports something missing: No module named 'a_package_that_is_not_installed'"),
    ("server with a module that does not import", ExitCode.CANNOT_RUN,
     "Error: module 'broken_task' imports something missing"),
    ("GPU not there", ExitCode.CANNOT_RUN, f"Error: --device {WRONG_DEVICE}, {WRONG_DEVICE_SAYS}"),
])
def test_a_users_mistake_ends_in_one_line_that_says_what_to_change(outcomes, name, code, says):
    outcome = outcomes[name]
    lines = outcome.stdout.splitlines()
    assert outcome.returncode == code, outcome.stdout
    assert "Traceback" not in outcome.stdout and len(lines) <= MOST_LINES, outcome.stdout
    assert lines[-1].startswith(says), outcome.stdout


def test_debug_logging_shows_the_traceback_of_a_users_mistake_too(outcomes):
    outcome = outcomes["debug shows the traceback"]
    assert outcome.returncode == ExitCode.CANNOT_RUN, outcome.stdout
    assert "Traceback (most recent call last)" in outcome.stdout and "in load_task" in outcome.stdout
    assert outcome.stdout.splitlines()[-1].startswith("Error: unknown task 'digits-resnet'")


def test_a_bug_keeps_its_traceback(outcomes):
    outcome = outcomes["a bug in the user's task"]
    assert outcome.returncode == ExitCode.BUG, outcome.stdout
    assert "Traceback (most recent call last)" in outcome.stdout
    assert "tiny_tasks.py\", line 8, in buggy_loss" in outcome.stdout, "the traceback points at the user's line"
    assert outcome.stdout.splitlines()[-1] == "ZeroDivisionError: division by zero"
