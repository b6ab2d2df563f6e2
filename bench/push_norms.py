"""The push bound's margin: how far above the median of the recent gradient norms normal training goes.

    python -m bench.push_norms

The server refuses a push whose ‖g‖ exceeds k times the median norm of the last
:data:`~gapaware.server.push_bound.WINDOW` accepted pushes (docs/ALGORITHMS.md#bounding-a-push).
This runs the simulator's asynchronous training (the server's own state and policy code, N
virtual workers with gamma-distributed step times, the default recipe: lr 0.05, momentum 0.9,
batch 32, step decay) on the built-in tasks without the bound, and prints per run the largest
and the 99.9th percentile of ``‖g_t‖ / median(‖g_{t−W}‖ … ‖g_{t−1}‖)`` over every push after the
first W: the ratio the bound's k must stay above for no push of that run to be refused. Runs
that diverge (ASGD with many workers) are listed too: their accuracy says so.
"""
from __future__ import annotations

import math
import statistics
from collections import deque

import torch

from bench.harness import machine_line, print_table, quick_or
from gapaware.common.results import PushResult
from gapaware.server.build import build_state
from gapaware.server.push_bound import WINDOW, gradient_norm
from gapaware.simulator.clock import WorkerClocks
from gapaware.simulator.gradients import GradientSource
from gapaware.simulator.master import LocalMaster
from gapaware.simulator.runner import RunSpec, SimulationSettings, run_async, run_config

RUNS = quick_or([("digits-mlp", "asgd", 2)],
                [(task, policy, workers) for task in ("digits-mlp", "digits-cnn", "synthetic")
                 for policy in ("asgd", "gap-aware") for workers in (1, 8, 32)])
"""(task, policy, virtual workers) of each run."""
EPOCHS = quick_or(3.0, 40.0)


class RecordingMaster(LocalMaster):
    """The simulator's master, keeping the norm of every gradient pushed."""

    def __init__(self, state, workers: int) -> None:
        super().__init__(state, workers)
        self.norms: list[float] = []

    def push(self, worker: int, grad: torch.Tensor, **details) -> PushResult:
        self.norms.append(gradient_norm(grad))
        return super().push(worker, grad, **details)


def ratios_to_recent_median(norms: list[float]) -> list[float]:
    """``norm / median of the WINDOW positive finite norms before it``, for each norm after the first WINDOW."""
    recent: deque[float] = deque(maxlen=WINDOW)
    ratios = []
    for norm in norms:
        if len(recent) == WINDOW and math.isfinite(norm):
            ratios.append(norm / statistics.median(recent))
        if math.isfinite(norm) and norm > 0:
            recent.append(norm)
    return ratios


def measure(task: str, policy: str, workers: int) -> tuple[float, float, float, int]:
    """Final accuracy, largest ratio, 99.9th percentile ratio and pushes of one run."""
    settings = SimulationSettings(task=task, epochs=EPOCHS)
    spec = RunSpec(policy, workers, seed=0)
    task_object, state = build_state(run_config(settings, spec), nonfinite="apply")
    gradients = GradientSource(task_object, workers=workers, batch_size=settings.batch_size, seed=0)
    master = RecordingMaster(state, workers)
    run_async(master, gradients, WorkerClocks(workers, seed=0, shape=settings.gamma_shape),
              batch_size=settings.batch_size, max_pushes=state.total_updates)
    accuracy = gradients.test_metrics(state.parameters()[1])[1]
    ratios = sorted(ratios_to_recent_median(master.norms)) or [math.nan]
    return accuracy, ratios[-1], ratios[int(0.999 * (len(ratios) - 1))], len(master.norms)


def main() -> None:
    torch.set_num_threads(1)
    print(f"push norm benchmark: {machine_line()}")
    rows = [(task, policy, workers, *measure(task, policy, workers)) for task, policy, workers in RUNS]
    print_table(f"largest gradient norm over the median of the previous {WINDOW} pushes, {EPOCHS:g} epochs, seed 0",
                ("task", "policy", "workers", "accuracy", "max ratio", "p99.9 ratio", "pushes"),
                [(t, p, n, acc, top, p999, pushes) for t, p, n, acc, top, p999, pushes in rows])
    print(f"\nlargest ratio of all runs: {max(r[4] for r in rows):.3g} "
          f"(converged runs, accuracy >= 0.5: {max((r[4] for r in rows if r[3] >= 0.5), default=math.nan):.3g})")


if __name__ == "__main__":
    main()
