"""Benchmark 8, time to accuracy: gapaware's asynchronous policies against synchronous SGD with PyTorch's
DistributedDataParallel, in wall-clock seconds, with the same emulated stragglers for both.

    python -m bench.time_to_accuracy                          # the default cells (docs/TIME_TO_ACCURACY.md)
    BENCH_GRID=full python -m bench.time_to_accuracy          # every task, N, delay model and policy
    BENCH_TASKS=synthetic BENCH_WORKERS=16 BENCH_DELAYS=hiccups python -m bench.time_to_accuracy

Synchronous training waits for its slowest worker at every step; gapaware's workers never wait for
each other, and Gap-Aware keeps their stale gradients from derailing the model. Every run here is
real processes on loopback (:mod:`bench.tta_runs`): a ``gapaware server`` and N ``gapaware worker``
processes, or N DDP ranks on gloo (:mod:`bench.ddp_worker`); each worker waits, after every step, a
delay from :mod:`gapaware.worker.delay` with one SPEC and seed for all systems, so worker k of
gapaware and rank k of DDP wait the same sequence. Per-worker batch 32, momentum 0.9, a constant
learning rate (a run ends at a wall-clock budget, so no schedule could know its length):

* gapaware: the single-worker rate 0.05 for every policy and N, as the paper evaluates GA;
* DDP: the single-worker rate 0.05 and the linearly scaled 0.05·N with a linear warm-up over
  ``WARMUP_STEPS`` steps (Goyal et al. 2017), both in the first cell of a task and N; later cells of
  that task and N run the better one only (a delay stretches DDP's steps in time but does not change
  its arithmetic, so the better rate in one delay model is the better in all).

The model is snapshotted every 0.25 s and the snapshots are evaluated on the test split after the
run. Reported per run: the seconds to the task's two targets, the final accuracy (mean over the last
``FINAL_SECONDS`` of snapshots), and each policy's time to the higher target divided by the best
DDP's in the same cell. The systems of a cell run one after another, their order rotating from
cell to cell. Outputs: a table on stdout, and in ``BENCH_TTA_OUT`` (default ``docs/time_to_accuracy``)
``results.csv``, ``curves.csv`` and a plot per task and N, one panel per delay model; a run
into the default folder also rewrites the table in ``docs/TIME_TO_ACCURACY.md``.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import tta_report
from bench.harness import QUICK, machine_line, print_table
from bench.tta_runs import run_ddp, run_gapaware

DELAYS = {
    "none": "none",
    "gamma": "gamma:mean=0.05,shape=4;seed=7",
    "hiccups": "gamma:mean=0.05,shape=4;hiccup:p=0.02,length=1;seed=7",
    "slow": "gamma:mean=0.05,shape=4;slow:fraction=0.25,factor=3;seed=7",
}
"""The delay models: none (the control), gamma(shape 4, mean 50 ms) after each step, the same with a
1 s hiccup after 2% of the steps, and the same with a quarter of the workers 3× slower."""
BUDGETS = {"none": 10.0, "gamma": 20.0, "hiccups": 35.0, "slow": 30.0}
"""Wall-clock seconds of every run in a cell, by delay model: long enough for DDP to reach 95% on
digits-cnn at 8 workers where it can (measured), short enough for the default cells to fit 15 min."""
TARGETS = {"digits-cnn": (0.90, 0.95), "synthetic": (0.60, 0.65)}
"""Two test accuracies per task; synthetic's single-worker SGD levels off near 0.70."""
POLICIES = ("gap-aware", "staleness-aware", "asgd", "dana-ga")
LR = 0.05
WARMUP_STEPS = 20
FINAL_SECONDS = 2.0


@dataclass(frozen=True)
class Cell:
    task: str
    workers: int
    delay: str
    policies: tuple[str, ...]
    budget: float | None = None          # None: the delay model's (BUDGETS)


DEFAULT_CELLS = (
    Cell("digits-cnn", 8, "none", ("gap-aware", "asgd")),
    Cell("digits-cnn", 8, "gamma", ("gap-aware",)),
    Cell("digits-cnn", 8, "hiccups", POLICIES),
    Cell("digits-cnn", 8, "slow", ("gap-aware",)),
    Cell("digits-cnn", 16, "hiccups", ("gap-aware",)),
    Cell("digits-cnn", 4, "hiccups", ("gap-aware",), budget=25.0),
    Cell("synthetic", 8, "hiccups", ("gap-aware",)),
)
"""What ``make bench`` runs; ``BENCH_GRID=full`` runs every task, N in 4, 8, 16, delay and policy."""
FULL_CELLS = tuple(Cell(task, workers, delay, POLICIES)
                   for task, workers, delay in itertools.product(TARGETS, (4, 8, 16), DELAYS))
QUICK_CELLS = (Cell("digits-cnn", 2, "quick", ("gap-aware",)),)
QUICK_DELAY, QUICK_BUDGET = "gamma:mean=0.01,shape=4;hiccup:p=0.05,length=0.1;seed=7", 3.0


@dataclass(frozen=True)
class System:
    """A policy of gapaware, or DDP at a learning rate (with its warm-up steps)."""

    name: str
    policy: str | None = None
    lr: float = LR
    warmup_steps: int = 0

    @property
    def is_ddp(self) -> bool:
        return self.policy is None


def ddp_systems(workers: int) -> tuple[System, ...]:
    single = System(f"ddp-lr{LR:g}", lr=LR)
    if QUICK:
        return (single,)
    return single, System(f"ddp-lr{LR * workers:g}-warmup", lr=LR * workers, warmup_steps=WARMUP_STEPS)


def cells() -> tuple[Cell, ...]:
    if QUICK:
        return QUICK_CELLS
    chosen = FULL_CELLS if os.environ.get("BENCH_GRID") == "full" else DEFAULT_CELLS

    def wanted(variable: str, value: object) -> bool:
        listed = os.environ.get(variable)
        return not listed or str(value) in listed.split(",")

    return tuple(c for c in chosen if wanted("BENCH_TASKS", c.task) and wanted("BENCH_WORKERS", c.workers)
                 and wanted("BENCH_DELAYS", c.delay))


def run(cell: Cell, system: System) -> tta_report.Result:
    delay = QUICK_DELAY if QUICK else DELAYS[cell.delay]
    budget = QUICK_BUDGET if QUICK else cell.budget or BUDGETS[cell.delay]
    started = time.monotonic()
    if system.is_ddp:
        outcome = run_ddp(cell.task, cell.workers, delay, budget, system.lr, system.warmup_steps)
    else:
        outcome = run_gapaware(cell.task, system.policy, cell.workers, delay, budget, LR)
    return tta_report.summarize(cell.task, cell.workers, cell.delay, system.name, system.is_ddp, budget, outcome,
                                TARGETS[cell.task], FINAL_SECONDS, wall=time.monotonic() - started,
                                load=os.getloadavg()[0])


def main() -> None:
    started = time.monotonic()
    print(f"time-to-accuracy benchmark: {machine_line()}", flush=True)
    results: list[tta_report.Result] = []
    best_ddp: dict[tuple[str, int], System] = {}
    for index, cell in enumerate(cells()):
        tried = (best_ddp[cell.task, cell.workers],) if (cell.task, cell.workers) in best_ddp \
            else ddp_systems(cell.workers)
        systems = [s for pair in itertools.zip_longest([System(p, policy=p) for p in cell.policies], tried)
                   for s in pair if s is not None]
        shift = index % len(systems)
        ran = []
        for system in systems[shift:] + systems[:shift]:
            result = run(cell, system)
            print(f"  {result.line()}", flush=True)
            ran.append((system, result))
        ddp_runs = [(s, r) for s, r in ran if s.is_ddp]
        best_ddp[cell.task, cell.workers] = min(ddp_runs, key=lambda sr: sr[1].rank_key())[0]
        results += [r for _, r in ran]
    results = tta_report.with_ratios(results)
    for task in dict.fromkeys(r.task for r in results):
        low, high = TARGETS[task]
        rows = [r.row() for r in results if r.task == task]
        print_table(f"{task}: seconds to {low:.0%} and {high:.0%} test accuracy ('>B': not within the budget B), "
                    f"final accuracy (%, mean of the last {FINAL_SECONDS:g} s), time to {high:.0%} ÷ the best DDP's",
                    tta_report.header(TARGETS[task]), rows)
    with contextlib.ExitStack() as stack:
        out = Path(os.environ.get("BENCH_TTA_OUT") or (stack.enter_context(tempfile.TemporaryDirectory())
                                                         if QUICK else tta_report.DOCS_OUT))
        written = tta_report.write(results, out, TARGETS)
        print(f"\nwrote {', '.join(str(p) for p in written)}")
    print(f"benchmark wall-clock: {time.monotonic() - started:.0f} s; {machine_line()}")


if __name__ == "__main__":
    main()
