"""One run of one system for :mod:`bench.time_to_accuracy`: start it, let it train for a wall-clock
budget, stop it and return its parameter snapshots with their times, evaluated after the run.

gapaware is a ``gapaware server`` process (:class:`gapaware.processes.ServerProcess`, as ``gapaware
train`` starts it) and N processes each running the ``gapaware worker`` command's own entry point;
the server checkpoints its parameters every ``SNAPSHOT_SECONDS`` (``--checkpoint-seconds``), off
the update path. DDP is N rank processes of :mod:`bench.ddp_worker`, rank 0 saving its parameters
as often. Both systems' workers are forked from one process that imported torch, gRPC and
scikit-learn once (multiprocessing's forkserver): a fresh interpreter spends seconds of CPU on those
imports, times N workers, for nothing that is measured (docs/TIME_TO_ACCURACY.md). Time zero is
the moment the workers are started, so each system's own start (joining the server, the process
group's rendezvous) counts against it.
"""
from __future__ import annotations

import contextlib
import functools
import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench import ddp_worker
from gapaware.common.evaluation import evaluate
from gapaware.common.layout import load_flat_parameters
from gapaware.common.tasks import load_task
from gapaware.server.checkpoint import read_checkpoint
from gapaware.worker import loop  # noqa: F401  imported by `gapaware worker` itself; here, once for every fork
from gapaware.processes import ServerProcess

SNAPSHOT_SECONDS = 0.25
BATCH_SIZE = 32
MOMENTUM = 0.9
STOP_TIMEOUT = 60.0
CTX = multiprocessing.get_context("forkserver")
# The fork server imports this module, and with it torch, gRPC, scikit-learn, gapaware's CLI and DDP.
CTX.set_forkserver_preload([__name__])


@dataclass
class Run:
    """A run's snapshots as ``(seconds since its start, accuracy)``, why it ended, and what it did."""

    curve: list[tuple[float, float]]
    ended: str                           # "budget", "diverged" or what failed
    steps: int = 0                       # gapaware: updates applied; DDP: synchronous steps
    stats: dict[str, float] = field(default_factory=dict)


def _gapaware_worker(argv: list[str], log_path: str) -> None:
    """A multiprocessing target: ``gapaware worker ARGV``, logging to ``log_path``."""
    with open(log_path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    from gapaware.cli import main

    main(["worker", *argv], prog_name="gapaware")


def run_gapaware(task: str, policy: str, workers: int, delay: str, budget: float, lr: float) -> Run:
    """gapaware with ``policy`` at learning rate ``lr`` and momentum 0.9 on ``workers`` workers."""
    with tempfile.TemporaryDirectory(prefix="gapaware-tta-") as tmp:
        workdir, checkpoints = Path(tmp), Path(tmp) / "checkpoints"
        server = ServerProcess(
            workdir, "--task", task, "--policy", policy, "--lr", str(lr), "--momentum", str(MOMENTUM),
            "--schedule", "constant", "--batch-size", str(BATCH_SIZE), "--max-updates", "1000000000",
            "--eval-every", "1000000000", "--checkpoint-dir", str(checkpoints), "--checkpoint-every", "0",
            "--checkpoint-seconds", str(SNAPSHOT_SECONDS), "--keep-checkpoints", "1000000", "--log-level", "warning")
        argv = ["--server", server.address, "--delay", delay, "--log-level", "warning"]
        procs = [CTX.Process(target=_gapaware_worker, args=(argv, str(workdir / f"worker-{i}.log")))
                 for i in range(workers)]
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(server.kill)   # runs last, even when killing the workers fails
            cleanup.callback(_kill, procs)
            _forkserver_ready()
            start = time.time()
            for proc in procs:
                proc.start()
            ended = _wait(procs, start + budget, lambda: all(p.exitcode is not None for p in procs),
                          server=server.proc)
            for proc in procs:
                proc.terminate()
            server.proc.send_signal(signal.SIGTERM)
            server.wait(timeout=STOP_TIMEOUT)
            for proc in procs:
                proc.join(timeout=STOP_TIMEOUT)
        if ended != "budget":
            ended = _why_gapaware_ended(workdir, workers)
        snapshots = [(path.stat().st_mtime - start, read_checkpoint(path).theta)
                     for path in sorted(checkpoints.glob("checkpoint-*.safetensors"))]
        final = (server.records("final") or [{}])[-1]
        return Run(_evaluate(task, snapshots, budget), ended, int(final.get("version", 0)),
                   {"mean staleness": final.get("run_mean_staleness", math.nan),
                    "mean gap": final.get("run_mean_gap", math.nan)})


def run_ddp(task: str, workers: int, delay: str, budget: float, lr: float, warmup_steps: int) -> Run:
    """DistributedDataParallel on ``workers`` ranks, SGD at ``lr`` (after ``warmup_steps``) and momentum 0.9."""
    with tempfile.TemporaryDirectory(prefix="gapaware-tta-ddp-") as tmp:
        workdir = Path(tmp)
        procs = [CTX.Process(target=ddp_worker.run_rank,
                             args=(rank, workers, str(workdir / "store"), task, lr, warmup_steps, BATCH_SIZE, delay,
                                   tmp, SNAPSHOT_SECONDS, str(workdir / f"rank-{rank}.log")))
                 for rank in range(workers)]
        try:
            _forkserver_ready()
            start = time.time()
            for proc in procs:
                proc.start()
            ended = _wait(procs, start + budget, lambda: any(p.exitcode is not None for p in procs))
        finally:
            _kill(procs)
        if ended != "budget":
            codes = [p.exitcode for p in procs]
            ended = "diverged" if ddp_worker.DIVERGED in codes else \
                f"failed (exit codes {codes}): {(workdir / 'rank-0.log').read_text()[-2000:]}"
        saved = [torch.load(path) for path in sorted(workdir.glob("step-*.pt"))]
        snapshots = [(s["time"] - start, s["theta"]) for s in saved]
        return Run(_evaluate(task, snapshots, budget), ended, saved[-1]["step"] if saved else 0)


def _forkserver_ready() -> None:
    """Starts the fork server (its imports take seconds, the first time) and waits until it forks."""
    proc = CTX.Process(target=int)
    proc.start()
    proc.join()


def _wait(procs: list, deadline: float, done, server=None) -> str:
    """Waits until ``deadline`` or until ``done()`` (or the server exits); says which."""
    while (left := deadline - time.time()) > 0:
        multiprocessing.connection.wait([p.sentinel for p in procs], timeout=min(left, 1.0))
        if done() or (server is not None and server.poll() is not None):
            return "stopped early"
    return "budget"


def _why_gapaware_ended(workdir: Path, workers: int) -> str:
    logs = "".join((workdir / f"worker-{i}.log").read_text() for i in range(workers))
    if "not finite" in logs or "NaN" in logs or "nonfinite" in logs.lower():
        return "diverged"
    return f"failed: {logs[-2000:]}"


def _kill(procs: list) -> None:
    for proc in (p for p in procs if p.pid is not None):
        if proc.exitcode is None:
            proc.kill()
        proc.join()


@functools.cache
def _task(name: str):
    return load_task(name, seed=0)


def _evaluate(task_name: str, snapshots: list[tuple[float, torch.Tensor]], budget: float) -> list[tuple[float, float]]:
    """Test accuracy of every snapshot taken within the budget (time zero for one taken before the start).

    On one thread: these small models evaluate several times slower on two threads of a busy machine,
    and idle OpenMP threads would spin into the next run."""
    torch.set_num_threads(1)
    task = _task(task_name)
    curve = []
    for seconds, theta in sorted(snapshots, key=lambda s: s[0]):
        if seconds <= budget:
            load_flat_parameters(task.model, theta)
            curve.append((max(0.0, seconds), evaluate(task.model, task.loss, task.test)[1]))
    return curve
