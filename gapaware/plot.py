"""``gapaware plot``: one PNG of a run from its JSON-lines metrics file.

Seven panels: test accuracy and loss (with the training loss) against seconds and against
updates, the histogram of push staleness (summed from each record's ``staleness_counts``), the
mean Gap of the pushes between evaluations over time (a gap in the line where no push arrived:
a Gap is at least 1, never 0) and the number of live workers over time.

A run resumed from a checkpoint (``--resume``) is one run: each record names its server's
``incarnation``, whose clock starts at 0, so each incarnation's seconds are drawn after the
previous one's last record (the time the server was down is not counted), with a dotted line
at each restart. A file that several runs appended to is drawn as one line a run: a run ends
at its ``"event": "final"`` record, or where time restarts within one incarnation, unless the
next record is of a later incarnation. Rendered with matplotlib's Agg canvas: no display needed.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

REQUIRED = ("version", "time")

PANELS = [["accuracy-time", "accuracy-version", "staleness", "staleness"],
          ["loss-time", "loss-version", "gap", "workers"]]


class PlotError(Exception):
    """The metrics file cannot be plotted; the message says why and where."""


def _continues(previous: dict, record: dict) -> bool:
    """Whether ``record`` (as read) belongs to the run of ``previous``: the same server going on, or
    its resumption."""
    before, now = previous.get("incarnation", 0), record.get("incarnation", 0)
    if now != before:
        return now > before
    return previous.get("event") != "final" and record["time"] >= previous["time"]


def read_runs(path: Path) -> list[list[dict]]:
    """The records of ``path``, split into runs, each incarnation's ``time`` shifted to follow the
    previous one's (see the module's doc)."""
    runs: list[list[dict]] = [[]]
    offset = 0.0
    previous = None  # the last record, as read
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise PlotError(f"{path}:{number}: not a JSON line ({error.msg})") from None
        if not isinstance(record, dict) or any(key not in record for key in REQUIRED):
            raise PlotError(f"{path}:{number}: not a gapaware metrics record (needs {', '.join(REQUIRED)})")
        if previous is not None:
            if not _continues(previous, record):
                runs.append([])
                offset = 0.0
            elif record.get("incarnation", 0) != previous.get("incarnation", 0):
                offset = runs[-1][-1]["time"]
        runs[-1].append({**record, "time": record["time"] + offset})
        previous = record
    runs = [run for run in runs if run]
    if not runs:
        raise PlotError(f"{path} has no metrics records: was the server given --metrics-file, and has it evaluated?")
    return runs


def restarts(run: list[dict]) -> list[float]:
    """The seconds (on the run's shifted clock) at which a new incarnation of its server took over."""
    return [previous["time"] for previous, record in zip(run, run[1:])
            if record.get("incarnation", 0) != previous.get("incarnation", 0)]


def _series(run: list[dict], x: str, y: str) -> tuple[list[float], list[float]]:
    points = [(r[x], r[y]) for r in run if isinstance(r.get(y), (int, float)) and math.isfinite(r[y])]
    return [p[0] for p in points], [p[1] for p in points]


def mean_gaps(run: list[dict]) -> tuple[list[float], list[float]]:
    """Seconds and the mean Gap of the pushes since the previous record; NaN for a record whose window
    had no push (its ``staleness_counts`` sum to 0), or with no Gap, so the line has a gap there."""
    def gap(record: dict) -> float:
        value = record.get("mean_gap")
        pushes = record.get("staleness_counts")
        if not isinstance(value, (int, float)) or (pushes is not None and not sum(pushes)):
            return math.nan
        return float(value)
    return [r["time"] for r in run], [gap(r) for r in run]


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
    figure = draw(read_runs(path), f"gapaware run: {path.name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure).print_png(str(out))
    return out


def draw(runs: list[list[dict]], title: str) -> Figure:
    """The figure of ``runs`` (from :func:`read_runs`), its panels named as in :data:`PANELS`."""
    figure = Figure(figsize=(20, 8), layout="constrained")
    axes = figure.subplot_mosaic(PANELS)
    figure.suptitle(title)
    for index, run in enumerate(runs):
        label = f"run {index + 1}" if len(runs) > 1 else None
        for x, xlabel in (("time", "seconds"), ("version", "updates")):
            accuracy, loss = axes[f"accuracy-{x}"], axes[f"loss-{x}"]
            accuracy.plot(*_series(run, x, "accuracy"), marker=".", label=label)
            accuracy.set(xlabel=xlabel, ylabel="test accuracy")
            loss.plot(*_series(run, x, "loss"), marker=".", label=f"test{f' ({label})' if label else ''}")
            loss.plot(*_series(run, x, "train_loss"), linestyle="--", label=f"train{f' ({label})' if label else ''}")
            loss.set(xlabel=xlabel, ylabel="loss")
            loss.legend(fontsize="small")
        counts = staleness_histogram(run)
        axes["staleness"].bar(range(len(counts)), counts, alpha=0.6 if len(runs) > 1 else 1.0, label=label)
        axes["gap"].plot(*mean_gaps(run), marker=".", label=label)
        axes["workers"].plot(*_series(run, "time", "workers"), marker=".", drawstyle="steps-post", label=label)
        for ax in (axes["accuracy-time"], axes["loss-time"], axes["gap"], axes["workers"]):
            for second in restarts(run):
                ax.axvline(second, color="grey", linestyle=":", linewidth=1)
    axes["staleness"].set(xlabel="staleness (updates between pull and push)", ylabel="pushes", title="staleness")
    if not any(staleness_histogram(run) for run in runs):
        axes["staleness"].text(0.5, 0.5, "no per-push staleness in this file", ha="center",
                               transform=axes["staleness"].transAxes)
    axes["gap"].set(xlabel="seconds", ylabel="mean Gap of the pushes", title="Gap")
    axes["workers"].set(xlabel="seconds", ylabel="live workers", title="workers")
    axes["workers"].yaxis.get_major_locator().set_params(integer=True)
    if len(runs) > 1:
        for name in ("accuracy-time", "accuracy-version", "staleness", "gap", "workers"):
            axes[name].legend(fontsize="small")
    for name, ax in axes.items():
        ax.set_label(name)
        ax.grid(alpha=0.3)
    return figure
