"""What a worker says while it runs (connecting, loading, a progress line every ``--progress-every``
seconds), how promptly it exits once done, and how a ``--procs`` parent reports its children."""
from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gapaware.command_line import gapaware_command
from gapaware.common.results import PushResult
from gapaware.worker.procs import run_worker_processes
from gapaware.worker.progress import Progress
from tests.waiting import wait_for

PROGRESS_LINE = re.compile(r"worker (\d+): ([\d.]+) steps/s, loss ([\d.e+-]+), staleness ([\d.]+), Gap ([\d.]+) "
                           r"over the last (\d+)s; server version (\d+)")
EXIT_CPU_SECONDS = 0.4
"""CPU seconds a worker may spend after logging ``done``: about half of what its interpreter's final
garbage collections over everything torch, scikit-learn and the task made took before the worker
froze them at exit (README, "Workers come and go")."""


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def push(version: int, staleness: int, gap: float, applied: bool = True) -> PushResult:
    return PushResult(version=version, staleness=staleness, mean_gap=gap, finished=False, applied=applied)


def test_the_progress_line_sums_up_the_steps_since_the_previous_one(caplog):
    caplog.set_level(logging.INFO, "gapaware.worker")
    clock = Clock()
    progress = Progress(every=10, clock=clock)
    for loss, result in ((2.0, push(5, 1, 1.5)), (1.0, push(7, 3, 2.5)), (float("nan"), push(7, 0, 0.0, False))):
        clock.now += 2.5
        progress.step(4, loss, result)
    assert not caplog.records, "not due before 10 s"
    clock.now += 2.5
    progress.step(4, 3.0, push(9, 2, 2.0))
    assert caplog.messages == ["worker 4: 0.4 steps/s, loss 2, staleness 2.00, Gap 2.000 over the last 10s; "
                               "server version 9"], "4 steps in 10 s; 3 finite losses; 3 pushes applied"
    clock.now += 10
    progress.step(4, 1.0, push(10, 0, 0.0, False))
    assert caplog.messages[-1] == "worker 4: 0.1 steps/s, loss 1, staleness -, Gap - over the last 10s; " \
                                  "server version 10", "the counts start again; no push applied: no means"


def test_progress_every_zero_prints_nothing(caplog):
    caplog.set_level(logging.INFO, "gapaware.worker")
    clock = Clock()
    progress = Progress(every=0, clock=clock)
    for _ in range(3):
        clock.now += 1000
        progress.step(1, 1.0, push(1, 0, 1.0))
    assert not caplog.records


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of process ``pid`` so far (an exited one not yet reaped still has its entry)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_worker_says_what_it_does_and_exits_promptly_once_done(servers, tmp_path):
    server = servers("--task", "digits-mlp", "--max-updates", "400", "--linger", "30")
    log = tmp_path / "worker.log"
    with log.open("w") as out:
        worker = subprocess.Popen(gapaware_command("worker", "--server", server.address, "--progress-every", "0.3"),
                                  stdout=out, stderr=subprocess.STDOUT)
    wait_for(lambda: " done after " in log.read_text(), 180, log.read_text, alive=worker, interval=0.01)
    done_at, cpu_at_done = time.monotonic(), cpu_seconds(worker.pid)
    _, status, usage = os.wait4(worker.pid, 0)
    exit_cpu, exit_wall = usage.ru_utime + usage.ru_stime - cpu_at_done, time.monotonic() - done_at
    text = log.read_text()
    assert os.waitstatus_to_exitcode(status) == 0, text

    said = [line.split(" INFO ", 1)[-1] for line in text.splitlines()]
    assert said[0] == f"connecting to {server.address}"
    assert said[1] == f"the server at {server.address} runs task digits-mlp (policy gap-aware): loading it"
    assert said[2].startswith("worker 1 joined")
    progress = [PROGRESS_LINE.fullmatch(line) for line in said[3:-1]]
    assert progress and all(progress), said
    for match in progress:
        worker_id, rate, loss, staleness, gap, _, version = match.groups()
        assert worker_id == "1" and float(rate) > 0 and 0 < float(loss) < 5 and 0 < int(version) <= 400
        assert float(staleness) == 0 and float(gap) == 1, "one worker: every push is fresh, its Gap is 1"
    assert said[-1].startswith("worker 1 done after 400 steps")
    assert exit_cpu < EXIT_CPU_SECONDS and exit_wall < 10, \
        f"{exit_cpu:.2f} CPU seconds and {exit_wall:.2f} s from done to exit"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health_children_of(pid: int) -> list[int]:
    """The ``gapaware health`` processes ``pid`` started (other tests may have left children of theirs)."""
    children = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return [child for child in children if b"health" in _cmdline(child)]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return b""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_procs_parent_reports_a_killed_child_at_once_and_lets_the_others_run(caplog):
    caplog.set_level(logging.INFO, "gapaware.worker")
    # Children that run until killed and start fast: `gapaware health` waiting for a server that never comes.
    argv = ["health", "--server", f"127.0.0.1:{free_port()}", "--wait", "600"]
    seen: dict[str, object] = {}

    def kill_one_then_the_other() -> None:
        first, second = wait_for(lambda: len(c := health_children_of(os.getpid())) >= 2 and c, 120,
                                 "two health processes")
        os.kill(first, signal.SIGKILL)
        reported_by = time.monotonic() + 10
        while "was killed by SIGKILL" not in caplog.text and time.monotonic() < reported_by:
            time.sleep(0.01)
        seen.update(reported=caplog.text, second_running=Path(f"/proc/{second}").exists()
                    and "gapaware" in Path(f"/proc/{second}/cmdline").read_text())
        os.kill(second, signal.SIGKILL)

    killer = threading.Thread(target=kill_one_then_the_other)
    killer.start()
    code = run_worker_processes(2, lambda i: argv)
    killer.join()
    assert "was killed by SIGKILL; 1 other worker process still running" in seen["reported"]
    assert seen["second_running"], "reported while the other child still ran"
    assert code == 1, "a child killed by a signal: exit 1"
    assert caplog.text.count("was killed by SIGKILL") == 2 and "0 other worker processes still running" in caplog.text
