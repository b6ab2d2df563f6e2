"""What a sweep writes: ``results.csv`` (one row per run), ``curves.csv`` (test metrics along each
run), ``results.md`` (mean ± std over seeds per policy × N) and ``results.png``."""
from __future__ import annotations

import csv
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from gapaware.simulator.runner import RunResult

RESULT_COLUMNS = ("policy", "workers", "seed", "final_accuracy", "mean_staleness", "mean_gap", "sim_time")
CURVE_COLUMNS = ("policy", "workers", "seed", "updates", "sim_time", "loss", "accuracy")


@dataclass(frozen=True)
class Cell:
    """The runs of one policy at one N, summarised over seeds."""

    policy: str
    workers: int
    runs: int
    accuracy_mean: float
    accuracy_std: float  # sample standard deviation; 0 for a single run
    mean_staleness: float
    mean_gap: float
    sim_time: float


def summarise(results: Sequence[RunResult]) -> list[Cell]:
    """One :class:`Cell` per policy × N, in the order the pairs first appear in ``results``."""
    groups: dict[tuple[str, int], list[RunResult]] = {}
    for result in results:
        groups.setdefault((result.policy, result.workers), []).append(result)
    cells = []
    for (policy, workers), runs in groups.items():
        accuracies = [r.final_accuracy for r in runs]
        cells.append(Cell(
            policy, workers, len(runs), statistics.fmean(accuracies),
            statistics.stdev(accuracies) if len(runs) > 1 else 0.0,
            statistics.fmean(r.mean_staleness for r in runs), statistics.fmean(r.mean_gap for r in runs),
            statistics.fmean(r.sim_time for r in runs),
        ))
    return cells


def write_results_csv(results: Sequence[RunResult], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(RESULT_COLUMNS)
        for r in results:
            writer.writerow([r.policy, r.workers, r.seed, f"{r.final_accuracy:.6f}", f"{r.mean_staleness:.4f}",
                             f"{r.mean_gap:.4f}", f"{r.sim_time:.4f}"])


def write_curves_csv(results: Sequence[RunResult], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CURVE_COLUMNS)
        for r in results:
            for p in r.curve:
                writer.writerow([r.policy, r.workers, r.seed, p.updates, f"{p.sim_time:.4f}", f"{p.loss:.6f}",
                                 f"{p.accuracy:.6f}"])


def _policies(cells: Sequence[Cell]) -> list[str]:
    return list(dict.fromkeys(c.policy for c in cells))


def _workers(cells: Sequence[Cell]) -> list[int]:
    return sorted({c.workers for c in cells})


def accuracy_table(results: Sequence[RunResult]) -> str:
    """Markdown: final test accuracy (%), mean ± std over seeds, one row per policy, one column per N."""
    cells = summarise(results)
    by_key = {(c.policy, c.workers): c for c in cells}
    workers = _workers(cells)
    lines = ["| policy | " + " | ".join(f"N={n}" for n in workers) + " |",
             "| --- |" + " ---: |" * len(workers)]
    for policy in _policies(cells):
        row = [f"{100 * c.accuracy_mean:.2f} ± {100 * c.accuracy_std:.2f}" if (c := by_key.get((policy, n))) else "—"
               for n in workers]
        lines.append(f"| {policy} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def results_markdown(results: Sequence[RunResult], *, preamble: str = "") -> str:
    """The accuracy table (policy × N) and the long table of every column averaged over seeds."""
    cells = summarise(results)
    policies = _policies(cells)
    seeds = sorted({r.seed for r in results})
    lines = ["# Simulated comparison of staleness policies", ""]
    if preamble:
        lines += [preamble.rstrip(), ""]
    lines += [f"## Final test accuracy (%), mean ± std over seeds {', '.join(map(str, seeds))}", "",
              accuracy_table(results)]
    lines += ["", "## Every column, averaged over seeds", "",
              "| policy | N | runs | accuracy (%) | mean staleness | mean gap | simulated time |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c in sorted(cells, key=lambda c: (c.workers, policies.index(c.policy))):
        lines.append(f"| {c.policy} | {c.workers} | {c.runs} | {100 * c.accuracy_mean:.2f} ± "
                     f"{100 * c.accuracy_std:.2f} | {c.mean_staleness:.2f} | {c.mean_gap:.3f} | {c.sim_time:.1f} |")
    return "\n".join(lines) + "\n"


def plot(results: Sequence[RunResult], path: Path) -> None:
    """Left: final accuracy against N per policy (mean ± std). Right: test accuracy against simulated
    time at the largest N (each point the mean over seeds of one evaluation)."""
    cells = summarise(results)
    workers = _workers(cells)
    largest = workers[-1]
    figure = Figure(figsize=(12, 4.8), layout="constrained")
    by_n, by_time = figure.subplots(1, 2)
    for policy in _policies(cells):
        mine = sorted((c for c in cells if c.policy == policy), key=lambda c: c.workers)
        by_n.errorbar([c.workers for c in mine], [100 * c.accuracy_mean for c in mine],
                      yerr=[100 * c.accuracy_std for c in mine], marker="o", capsize=3, label=policy)
        curves = [r.curve for r in results if r.policy == policy and r.workers == largest]
        if curves:
            length = min(len(curve) for curve in curves)
            by_time.plot([statistics.fmean(curve[i].sim_time for curve in curves) for i in range(length)],
                         [100 * statistics.fmean(curve[i].accuracy for curve in curves) for i in range(length)],
                         marker=".", label=policy)
    if len(workers) > 1:
        by_n.set_xscale("log", base=2)
    by_n.set_xticks(workers, [str(n) for n in workers])
    by_n.set(xlabel="workers N", ylabel="final test accuracy (%)", title="Final test accuracy")
    by_n.grid(alpha=0.3)
    by_n.legend()
    by_time.set(xlabel="simulated time (mean batch time = 1)", ylabel="test accuracy (%)",
                title=f"Test accuracy over simulated time, N={largest}")
    by_time.grid(alpha=0.3)
    by_time.legend()
    figure.savefig(path, dpi=110)


def write_report(results: Sequence[RunResult], out: Path, *, preamble: str = "") -> dict[str, Path]:
    """Write every output file into ``out`` (created if needed); their paths by kind."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": out / "results.csv", "curves": out / "curves.csv", "table": out / "results.md",
             "plot": out / "results.png"}
    write_results_csv(results, paths["results"])
    write_curves_csv(results, paths["curves"])
    paths["table"].write_text(results_markdown(results, preamble=preamble))
    plot(results, paths["plot"])
    return paths
