"""What :mod:`bench.time_to_accuracy` reports: each run's times to its task's targets and final accuracy,
gapaware's time over the best DDP's, as a table, CSV files, plots and the table of the user's doc."""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from bench.tta_runs import Run
from gapaware.cli_reference import replace_block

DOCS = Path(__file__).resolve().parents[1] / "docs"
DOCS_OUT = DOCS / "time_to_accuracy"
DOC = DOCS / "TIME_TO_ACCURACY.md"
START, END = "<!-- time-to-accuracy:start -->", "<!-- time-to-accuracy:end -->"
DASH = "—"
COLOURS = {"gap-aware": "tab:red", "dana-ga": "tab:purple", "staleness-aware": "tab:green", "asgd": "tab:orange"}
CHANCE_MARGIN = 0.02
"""A run that ends no more than this above its untrained model's accuracy (chance) has diverged, even
when its loss stayed finite (the model then predicts one class)."""


@dataclass(frozen=True)
class Result:
    task: str
    workers: int
    delay: str
    system: str
    is_ddp: bool
    budget: float
    t_low: float | None                  # seconds to the lower target; None: not within the budget
    t_high: float | None
    final: float                         # mean accuracy over the run's last seconds
    steps: int
    ended: str
    curve: list[tuple[float, float]] = field(repr=False)
    wall: float = math.nan               # seconds the run took, start and evaluation included
    load: float = math.nan               # the machine's 1-minute load average as the run ended
    ratio: float | None = None           # t_high ÷ the best DDP's in the cell (gapaware only)
    ratio_bound: bool = False            # the best DDP missed the target: ratio is t_high ÷ budget, an upper bound

    def rank_key(self) -> tuple[float, float]:
        """Orders runs best first: sooner at the higher target, then higher final accuracy."""
        return (self.t_high if self.t_high is not None else math.inf, -self.final)

    def line(self) -> str:
        return (f"{self.task} N={self.workers} {self.delay} {self.system}: to targets {_seconds(self.t_low, self)}, "
                f"{_seconds(self.t_high, self)} s, final {100 * self.final:.1f}%, {self.steps} steps, "
                f"ended: {self.ended[:400]}; {self.wall:.0f} s of wall-clock, load average {self.load:.1f}")

    def row(self) -> list[object]:
        return [self.workers, self.delay, self.system, _seconds(self.t_low, self), _seconds(self.t_high, self),
                round(100 * self.final, 1), self.ratio_text(), self.steps, self.ended.split()[0].rstrip(":"),
                round(self.load, 1)]

    def ratio_text(self) -> str:
        if self.ratio is None:
            return DASH
        return f"<{self.ratio:.2f}" if self.ratio_bound else f"{self.ratio:.2f}"


def header(targets: tuple[float, float]) -> list[str]:
    low, high = targets
    return ["N", "delay", "system", f"to {low:.0%} (s)", f"to {high:.0%} (s)", "final %", "÷ DDP", "steps", "ended",
            "load"]


def _seconds(value: float | None, result: Result) -> str:
    return f"{value:.1f}" if value is not None else f">{result.budget:g}"


def summarize(task: str, workers: int, delay: str, system: str, is_ddp: bool, budget: float, run: Run,
              targets: tuple[float, float], final_seconds: float, wall: float = math.nan,
              load: float = math.nan) -> Result:
    def first_at(target: float) -> float | None:
        return next((seconds for seconds, accuracy in run.curve if accuracy >= target), None)

    last = run.curve[-1][0] if run.curve else 0.0
    tail = [accuracy for seconds, accuracy in run.curve if seconds >= last - final_seconds]
    final = sum(tail) / len(tail) if tail else math.nan
    ended = "diverged" if run.curve and final <= run.curve[0][1] + CHANCE_MARGIN else run.ended
    return Result(task, workers, delay, system, is_ddp, budget, first_at(targets[0]), first_at(targets[1]), final,
                  run.steps, ended, run.curve, wall, load)


def with_ratios(results: list[Result]) -> list[Result]:
    """The results, each gapaware run with its time to the higher target over the cell's best DDP's."""
    out = []
    for result in results:
        ddp = [r for r in results if r.is_ddp and (r.task, r.workers, r.delay) == (result.task, result.workers,
                                                                                  result.delay)]
        if result.is_ddp or not ddp or result.t_high is None:
            out.append(result)
            continue
        best = min(ddp, key=Result.rank_key)
        bound = best.t_high is None
        out.append(replace(result, ratio=result.t_high / (best.budget if bound else best.t_high), ratio_bound=bound))
    return out


def write(results: list[Result], out: Path, targets: dict[str, tuple[float, float]]) -> list[Path]:
    """Writes results.csv, curves.csv and the plots into ``out`` (and the doc's table when ``out`` is the
    docs folder); returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = [_results_csv(results, out / "results.csv"), _curves_csv(results, out / "curves.csv")]
    for task, workers in dict.fromkeys((r.task, r.workers) for r in results):
        written.append(_plot([r for r in results if (r.task, r.workers) == (task, workers)], targets[task],
                             out / f"{task}-n{workers}.png"))
    if out.resolve() == DOCS_OUT and DOC.exists():
        DOC.write_text(replace_block(DOC.read_text(), markdown_tables(results, targets), START, END))
        written.append(DOC)
    return written


def _results_csv(results: list[Result], path: Path) -> Path:
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["task", "workers", "delay", "system", "budget_s", "seconds_to_low", "seconds_to_high",
                         "final_accuracy", "high_vs_best_ddp", "ratio_is_upper_bound", "steps", "ended", "wall_s",
                         "load_average_1min"])
        for r in results:
            writer.writerow([r.task, r.workers, r.delay, r.system, r.budget, _csv(r.t_low), _csv(r.t_high),
                             f"{r.final:.4f}", _csv(r.ratio), r.ratio_bound, r.steps, r.ended.split()[0],
                             f"{r.wall:.1f}", f"{r.load:.2f}"])
    return path


def _curves_csv(results: list[Result], path: Path) -> Path:
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["task", "workers", "delay", "system", "seconds", "accuracy"])
        for r in results:
            writer.writerows([r.task, r.workers, r.delay, r.system, f"{s:.3f}", f"{a:.4f}"] for s, a in r.curve)
    return path


def _csv(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def _plot(results: list[Result], targets: tuple[float, float], path: Path) -> Path:
    # Imported here: every worker process imports the benchmark's main module again, and matplotlib
    # would slow each one's start.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    delays = list(dict.fromkeys(r.delay for r in results))
    figure = Figure(figsize=(4.2 * len(delays), 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(delays), squeeze=False, sharey=True)[0]
    for ax, delay in zip(axes, delays):
        for r in (r for r in results if r.delay == delay):
            seconds, accuracy = zip(*r.curve) if r.curve else ((), ())
            ax.step(seconds, accuracy, where="post", label=r.system + (" (diverged)" if r.ended == "diverged"
                                                                     else ""), **_style(r))
        for target in targets:
            ax.axhline(target, color="grey", linewidth=0.6, linestyle=":")
        ax.set_title(f"{results[0].task}, N={results[0].workers}, delay: {delay}", fontsize=9)
        ax.set_xlabel("wall-clock seconds")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("test accuracy")
    figure.savefig(path, dpi=110)
    return path


def _style(result: Result) -> dict:
    """The same colour for a system in every panel: DDP dashed black (grey with the scaled rate)."""
    if result.is_ddp:
        return dict(color="grey" if "warmup" in result.system else "black", linestyle="--", linewidth=1.4)
    return dict(color=COLOURS.get(result.system, "tab:blue"), linewidth=1.8 if result.system == "gap-aware" else 1.0)


def markdown_tables(results: list[Result], targets: dict[str, tuple[float, float]]) -> str:
    parts = []
    for task in dict.fromkeys(r.task for r in results):
        low, high = targets[task]
        parts.append(f"\n**{task}** (seconds to {low:.0%} / {high:.0%} test accuracy; ÷ DDP: time to {high:.0%} "
                     "over the best DDP's in the same cell)\n\n"
                     "| " + " | ".join(header(targets[task])) + " |\n"
                     "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |\n")
        parts += ["| " + " | ".join(str(cell) for cell in r.row()) + " |\n" for r in results if r.task == task]
    return "".join(parts) + "\n"

