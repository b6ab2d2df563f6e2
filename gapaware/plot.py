"""``gapaware plot``: one PNG of a run from its JSON-lines metrics file.

Six panels: test accuracy and loss (with the training loss) against seconds and against
updates, the histogram of push staleness (summed from each record's ``staleness_counts``)
and the mean Gap of the pushes between evaluations over time. A file that several runs
appended to (each ends with an ``"event": "final"`` record) is drawn as one line a run.
Rendered with matplotlib's Agg canvas: no display needed.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

REQUIRED = ("version", "time")


class PlotError(Exception):
    """The metrics file cannot be plotted; the message says why and where."""


def read_runs(path: Path) -> list[list[dict]]:
    """The records of ``path``, split into runs (a run ends at its final record or where time restarts)."""
    runs: list[list[dict]] = [[]]
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise PlotError(f"{path}:{number}: not a JSON line ({error.msg})") from None
        if not isinstance(record, dict) or any(key not in record for key in REQUIRED):
            raise PlotError(f"{path}:{number}: not a gapaware metrics record (needs {', '.join(REQUIRED)})")
        current = runs[-1]
        if current and (current[-1].get("event") == "final" or record["time"] < current[-1]["time"]):
            runs.append(current := [])
        current.append(record)
    runs = [run for run in runs if run]
    if not runs:
        raise PlotError(f"{path} has no metrics records: was the server given --metrics-file, and has it evaluated?")
    return runs


def _series(run: list[dict], x: str, y: str) -> tuple[list[float], list[float]]:
    points = [(r[x], r[y]) for r in run if isinstance(r.get(y), (int, float)) and math.isfinite(r[y])]
    return [p[0] for p in points], [p[1] for p in points]


def staleness_histogram(run: list[dict]) -> list[int]:
    """Pushes of each staleness over the run, from the records' per-window counts."""
    total: list[int] = []
    for record in run:
        counts = record.get("staleness_counts") or []
        total.extend([0] * (len(counts) - len(total)))
        for staleness, count in enumerate(counts):
            total[staleness] += count
    return total


def plot_metrics(path: Path, out: Path) -> Path:
    runs = read_runs(path)
    figure = Figure(figsize=(15, 8), layout="constrained")
    axes = figure.subplots(2, 3)
    figure.suptitle(f"gapaware run: {path.name}")
    for index, run in enumerate(runs):
        label = f"run {index + 1}" if len(runs) > 1 else None
        for column, (x, xlabel) in enumerate((("time", "seconds"), ("version", "updates"))):
            accuracy, loss = axes[0][column], axes[1][column]
            accuracy.plot(*_series(run, x, "accuracy"), marker=".", label=label)
            accuracy.set(xlabel=xlabel, ylabel="test accuracy")
            loss.plot(*_series(run, x, "loss"), marker=".", label=f"test{f' ({label})' if label else ''}")
            loss.plot(*_series(run, x, "train_loss"), linestyle="--", label=f"train{f' ({label})' if label else ''}")
            loss.set(xlabel=xlabel, ylabel="loss")
            loss.legend(fontsize="small")
        counts = staleness_histogram(run)
        axes[0][2].bar(range(len(counts)), counts, alpha=0.6 if len(runs) > 1 else 1.0, label=label)
        axes[1][2].plot(*_series(run, "time", "mean_gap"), marker=".", label=label)
    axes[0][2].set(xlabel="staleness (updates between pull and push)", ylabel="pushes", title="staleness")
    if not any(staleness_histogram(run) for run in runs):
        axes[0][2].text(0.5, 0.5, "no per-push staleness in this file", ha="center", transform=axes[0][2].transAxes)
    axes[1][2].set(xlabel="seconds", ylabel="mean Gap of the pushes", title="Gap")
    if len(runs) > 1:
        for ax in (axes[0][0], axes[0][1], axes[0][2], axes[1][2]):
            ax.legend(fontsize="small")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure).print_png(str(out))
    return out
