"""bench.tta_report's arithmetic: times to the targets, final accuracy, divergence and the ratio to DDP."""
import pytest

from bench.tta_report import Result, markdown_tables, summarize, with_ratios
from bench.tta_runs import Run

TARGETS = (0.90, 0.95)


def result(system: str, curve: list[tuple[float, float]], budget: float = 10.0, ended: str = "budget") -> Result:
    return summarize("digits-cnn", 8, "hiccups", system, system.startswith("ddp"), budget,
                     Run(curve, ended, steps=len(curve)), TARGETS, final_seconds=2.0)


def test_times_are_the_first_snapshot_at_each_target_and_final_the_mean_of_the_last_seconds():
    r = result("gap-aware", [(0.0, 0.1), (1.0, 0.91), (2.0, 0.89), (3.0, 0.96), (6.0, 0.97), (7.0, 0.95), (8.0, 0.99)])
    assert (r.t_low, r.t_high) == (1.0, 3.0)
    assert r.final == pytest.approx((0.97 + 0.95 + 0.99) / 3)
    assert r.ended == "budget"


def test_a_target_not_reached_is_none_and_shown_as_beyond_the_budget():
    r = result("ddp-lr0.05", [(0.0, 0.1), (5.0, 0.92), (10.0, 0.93)])
    assert r.t_low == 5.0 and r.t_high is None
    assert r.row()[4] == ">10"


def test_a_run_that_ends_at_its_untrained_accuracy_has_diverged_even_with_a_finite_loss():
    assert result("asgd", [(0.0, 0.097), (3.0, 0.43), (9.0, 0.10), (10.0, 0.10)]).ended == "diverged"


def test_the_ratio_is_to_the_best_ddp_in_the_same_cell_and_a_bound_when_ddp_missed():
    fast_ddp = result("ddp-lr0.05", [(0.0, 0.1), (8.0, 0.96)])
    slow_ddp = result("ddp-lr0.4-warmup", [(0.0, 0.1), (9.0, 0.96)])
    ga = result("gap-aware", [(0.0, 0.1), (2.0, 0.96)])
    missed = result("asgd", [(0.0, 0.1), (2.0, 0.5)])
    rated = {r.system: r for r in with_ratios([ga, fast_ddp, missed, slow_ddp])}
    assert rated["gap-aware"].ratio == pytest.approx(2.0 / 8.0) and not rated["gap-aware"].ratio_bound
    assert rated["asgd"].ratio is None and rated["asgd"].ratio_text() == "—"
    assert rated["ddp-lr0.05"].ratio is None
    bound = {r.system: r for r in with_ratios([ga, result("ddp-lr0.05", [(0.0, 0.1), (10.0, 0.9)])])}
    assert bound["gap-aware"].ratio == pytest.approx(2.0 / 10.0) and bound["gap-aware"].ratio_text() == "<0.20"


def test_the_markdown_table_has_as_many_cells_in_every_row_as_in_its_header():
    runs = [result("gap-aware", [(0.0, 0.1), (2.0, 0.96)]), result("ddp-lr0.05", [(0.0, 0.1), (8.0, 0.96)])]
    lines = [line for line in markdown_tables(with_ratios(runs), {"digits-cnn": TARGETS}).splitlines()
             if line.startswith("|")]
    assert len(lines) == 4
    assert len({line.count("|") for line in lines}) == 1
