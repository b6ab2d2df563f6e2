"""``gapaware simulate``: check the inputs, run the sweep, write the report and print the table."""
from __future__ import annotations

import platform
import shlex
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import click

from gapaware.common.tasks import TaskError, load_task
from gapaware.simulator.report import accuracy_table, write_report
from gapaware.simulator.runner import SYNCHRONOUS, RunResult, SimulationSettings, run_config
from gapaware.simulator.sweep import available_cores, grid, run_sweep


def run_simulation(settings: SimulationSettings, *, policies: Iterable[str], workers: Iterable[int],
                   seeds: Iterable[int], jobs: int = 0, out: Path | None = None) -> list[RunResult]:
    """Run every policy × N × seed, write the report into ``out`` and print the accuracy table.

    Bad inputs (a task that does not load, a policy that cannot run with these settings) fail
    before the first run with a message saying what to change. ``jobs`` 0: one per CPU core.
    """
    specs = grid(policies, workers, seeds)
    try:
        configs = [run_config(settings, spec) for spec in specs]
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    try:
        task = load_task(settings.task, seed=0, data_dir=settings.data_dir)
    except TaskError as error:
        raise click.ClickException(str(error)) from None
    out = out or Path("runs") / time.strftime("simulate-%Y%m%d-%H%M%S")
    jobs = min(jobs or available_cores(), len(specs))
    click.echo(f"gapaware simulate: task {settings.task}, {len(specs)} runs of {settings.epochs:g} epochs "
               f"({len(task.train)} training examples), {jobs} at a time; results in {out}")
    started = time.monotonic()
    results = run_sweep(settings, specs, jobs=jobs)
    elapsed = time.monotonic() - started
    updates = {(r.policy == SYNCHRONOUS, r.workers if r.policy == SYNCHRONOUS else 0): r.updates for r in results}
    preamble = "\n".join([
        f"Command: `{shlex.join(['gapaware', *sys.argv[1:]])}`",
        "",
        f"Settings: `{settings}`",
        "",
        "Updates per run (every run processes the same number of examples): "
        + "; ".join(f"SSGD at N={n}: {count}" if synchronous else f"asynchronous: {count}"
                    for (synchronous, n), count in sorted(updates.items())) + ".",
        "",
        f"Machine: {platform.platform()}, Python {platform.python_version()}, {available_cores()} cores; "
        f"{len(specs)} runs took {elapsed:.0f} s of wall-clock, {jobs} at a time.",
    ])
    paths = write_report(results, out, preamble=preamble)
    click.echo(accuracy_table(results))
    click.echo(f"wrote {', '.join(str(p) for p in paths.values())} ({elapsed:.0f} s)")
    return results
