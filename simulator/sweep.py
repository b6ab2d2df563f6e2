"""The grid of runs: every policy × number of workers × seed, in parallel processes, with a progress bar.

Each run is independent and seeded, so the results do not depend on ``jobs`` or on the order in
which runs finish. Every process uses one torch thread: the models are small and several runs at
once use the cores better than one run with several threads.
"""
from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed

import torch
from tqdm import tqdm

from gapaware.simulator.runner import RunResult, RunSpec, SimulationSettings, simulate_run


def grid(policies: Iterable[str], workers: Iterable[int], seeds: Iterable[int]) -> list[RunSpec]:
    """One :class:`RunSpec` per policy × N × seed."""
    return [RunSpec(policy, n, seed) for n in workers for seed in seeds for policy in policies]


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _single_threaded() -> None:
    torch.set_num_threads(1)


def run_sweep(settings: SimulationSettings, specs: list[RunSpec], *, jobs: int = 1,
              progress: bool = True) -> list[RunResult]:
    """Run every spec (``jobs`` at a time in separate processes; in this process when 1) and return
    the results in the order of ``specs``."""
    if jobs < 1:
        raise ValueError(f"Invalid number of jobs: {jobs}")
    results: dict[RunSpec, RunResult] = {}
    with tqdm(total=len(specs), unit="run", dynamic_ncols=True, disable=not progress) as bar:
        def done(result: RunResult) -> None:
            results[RunSpec(result.policy, result.workers, result.seed)] = result
            bar.set_postfix_str(f"{result.policy} N={result.workers} seed={result.seed}: "
                                f"acc {result.final_accuracy:.3f}", refresh=False)
            bar.update()

        if jobs == 1:
            threads = torch.get_num_threads()
            _single_threaded()
            try:
                for spec in specs:
                    done(simulate_run(settings, spec))
            finally:
                torch.set_num_threads(threads)
        else:
            context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch threads
            with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_single_threaded) as pool:
                futures = [pool.submit(simulate_run, settings, spec) for spec in specs]
                try:
                    for future in as_completed(futures):
                        done(future.result())
                except BaseException:  # a failed run or Ctrl-C: do not start the runs still queued
                    for future in futures:
                        future.cancel()
                    raise
    return [results[spec] for spec in specs]
