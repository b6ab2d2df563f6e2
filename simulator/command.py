"""``gapaware simulate``: check the inputs, run the sweep, write the report and print the table."""
from __future__ import annotations

import dataclasses
import platform
import shlex
import time
from collections.abc import Sequence
from pathlib import Path

import click

from gapaware.command_line import flags, group_flags
from gapaware.common.registry import SYNCHRONOUS_SGD
from gapaware.common.devices import check_device
from gapaware.common.tasks import load_task
from gapaware.simulator.report import accuracy_table, write_report
from gapaware.simulator.runner import RunResult, SimulationSettings, run_config
from gapaware.simulator.sweep import available_cores, grid, run_sweep


def command_line(settings: SimulationSettings, *, policies: Sequence[str], workers: Sequence[int], seeds: int) -> str:
    """The ``gapaware simulate`` command that reproduces a sweep, every setting spelled out."""
    options = {"task": settings.task, "workers": workers, "policies": policies, "seeds": seeds,
               **dataclasses.asdict(settings)}
    repeated = group_flags(options)
    return shlex.join(["gapaware", "simulate", *flags(options), *repeated])


def run_simulation(settings: SimulationSettings, *, policies: Sequence[str], workers: Sequence[int],
                   seeds: int, jobs: int = 0, out: Path | None = None) -> list[RunResult]:
    """Run every policy × N × seed (seeds 0 … ``seeds``−1), write the report into ``out`` and print the
    accuracy table.

    Bad inputs (a task that does not load, a policy that cannot run with these settings) fail
    before the first run with a message saying what to change. ``jobs`` 0: one per CPU core.
    """
    specs = grid(policies, workers, range(seeds))
    try:
        for spec in specs:
            run_config(settings, spec)  # the server's checks, e.g. nag-asgd needs momentum
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    check_device(settings.device)
    task = load_task(settings.task, seed=0, data_dir=settings.data_dir)
    out = out or Path("runs") / time.strftime("simulate-%Y%m%d-%H%M%S")
    jobs = min(jobs or available_cores(), len(specs))
    click.echo(f"gapaware simulate: task {settings.task}, {len(specs)} runs of {settings.epochs:g} epochs "
               f"({len(task.train)} training examples), {jobs} at a time; results in {out}")
    started = time.monotonic()
    results = run_sweep(settings, specs, jobs=jobs)
    elapsed = time.monotonic() - started
    asynchronous = [r.updates for r in results if r.policy != SYNCHRONOUS_SGD][:1]
    updates = [f"asynchronous: {count}" for count in asynchronous] + \
        [f"SSGD at N={r.workers}: {r.updates}" for r in results if r.policy == SYNCHRONOUS_SGD and r.seed == 0]
    preamble = "\n".join([
        f"Command: `{command_line(settings, policies=policies, workers=workers, seeds=seeds)}`",
        "",
        f"Updates per run (every run processes the same number of examples): {'; '.join(updates)}.",
        "",
        f"Machine: {platform.platform()}, Python {platform.python_version()}, {available_cores()} cores; "
        f"{len(specs)} runs took {elapsed:.0f} s of wall-clock, {jobs} at a time.",
    ])
    paths = write_report(results, out, preamble=preamble)
    click.echo(accuracy_table(results))
    click.echo(f"wrote {', '.join(str(p) for p in paths.values())} ({elapsed:.0f} s)")
    return results
