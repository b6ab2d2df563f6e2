"""``gapaware plot`` turns a metrics file into a PNG, and says what is wrong with a bad file."""
import json
import math
import signal
import struct

import torch
from click.testing import CliRunner

from gapaware import WorkerClient
from gapaware.cli import main
from gapaware.plot import draw, mean_gaps, read_runs, restarts, staleness_histogram


def record(event, version, time, accuracy, counts):
    return {"event": event, "version": version, "time": time, "epoch": version / 50, "loss": 2 - accuracy,
            "accuracy": accuracy, "lr": 0.05, "workers": 3, "mean_staleness": 1.5, "mean_gap": 1.2,
            "train_loss": None if event == "final" else 2.1 - accuracy, "staleness_counts": counts}


def write_lines(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    assert data[-8:-4] == b"IEND", "PNG truncated"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_a_png_next_to_the_metrics_file(tmp_path):
    metrics = write_lines(tmp_path / "metrics.jsonl", [
        record("eval", 100, 1.0, 0.5, [10, 60, 30]),
        record("eval", 200, 2.1, 0.8, [5, 50, 40, 5]),
        record("final", 230, 2.5, 0.85, [0, 30]),
    ])
    result = CliRunner().invoke(main, ["plot", str(metrics)])
    assert result.exit_code == 0, result.output
    assert png_size(tmp_path / "metrics.png") == (2000, 800)
    assert staleness_histogram(read_runs(metrics)[0]) == [15, 140, 70, 5]


def test_runs_appended_to_one_file_are_told_apart(tmp_path):
    metrics = write_lines(tmp_path / "m.jsonl", [
        record("eval", 100, 1.0, 0.5, [1]), record("final", 120, 1.5, 0.6, [2]),
        record("eval", 100, 1.2, 0.55, [3]), record("eval", 200, 2.0, 0.7, [4]),
        record("eval", 100, 0.9, 0.4, [5]),  # time went back: a run that crashed before its final record
    ])
    assert [[r["version"] for r in run] for run in read_runs(metrics)] == [[100, 120], [100, 200], [100]]
    out = tmp_path / "plots" / "runs.png"
    assert CliRunner().invoke(main, ["plot", str(metrics), "-o", str(out)]).exit_code == 0
    assert png_size(out) == (2000, 800)


def test_a_bad_metrics_file_is_refused_with_its_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(record("eval", 100, 1.0, 0.5, [1])) + "\n{not json\n")
    result = CliRunner().invoke(main, ["plot", str(bad)])
    assert result.exit_code == 1 and f"{bad}:2: not a JSON line" in result.output
    assert not (tmp_path / "bad.png").exists()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    result = CliRunner().invoke(main, ["plot", str(empty)])
    assert result.exit_code == 1 and "has no metrics records" in result.output
    other = write_lines(tmp_path / "other.jsonl", [{"accuracy": 0.5}])
    result = CliRunner().invoke(main, ["plot", str(other)])
    assert result.exit_code == 1 and "other.jsonl:1: not a gapaware metrics record" in result.output


def panel(figure, name):
    return next(ax for ax in figure.axes if ax.get_label() == name)


def test_a_resumed_run_is_one_run_whose_incarnations_follow_each_other(tmp_path):
    metrics = write_lines(tmp_path / "m.jsonl", [
        {**record("eval", 100, 1.0, 0.5, [1, 2]), "incarnation": 0},
        {**record("eval", 200, 2.0, 0.6, [2, 1]), "incarnation": 0},   # killed after this
        {**record("eval", 200, 0.5, 0.6, [3]), "incarnation": 1},      # resumed from version 150's checkpoint
        {**record("final", 300, 1.5, 0.7, [1]), "incarnation": 1},
        {**record("eval", 50, 3.0, 0.8, [1]), "incarnation": 2},       # resumed again, after the final record
        {**record("eval", 100, 0.7, 0.4, [1]), "incarnation": 0},      # a new run appended to the same file
    ])
    first, second = read_runs(metrics)
    assert [r["time"] for r in first] == [1.0, 2.0, 2.5, 3.5, 6.5], "each incarnation's seconds follow the last"
    assert restarts(first) == [2.0, 3.5] and restarts(second) == []
    assert [r["time"] for r in second] == [0.7]


def test_a_window_without_pushes_leaves_a_gap_in_the_gap_line_and_workers_get_a_panel(tmp_path):
    quiet = {**record("eval", 200, 2.0, 0.6, []), "mean_gap": 0.0, "workers": 0}  # what a window without pushes says
    runs = [[record("eval", 100, 1.0, 0.5, [1, 2]), quiet, {**record("eval", 300, 3.0, 0.7, [3]), "workers": 2}]]
    seconds, gaps = mean_gaps(runs[0])
    assert seconds == [1.0, 2.0, 3.0] and gaps[0] == gaps[2] == 1.2 and math.isnan(gaps[1])
    figure = draw(runs, "t")
    line, = panel(figure, "gap").get_lines()
    assert math.isnan(line.get_ydata()[1]), "matplotlib breaks the line at NaN"
    workers, = panel(figure, "workers").get_lines()
    assert list(workers.get_xdata()) == [1.0, 2.0, 3.0] and list(workers.get_ydata()) == [3, 0, 2]
    assert panel(figure, "workers").get_ylabel() == "live workers"


def test_a_real_server_resumed_from_its_checkpoint_plots_as_one_run(servers, tmp_path):
    checkpoints, metrics = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    checkpoints.mkdir()
    flags = ("--task", "digits-mlp", "--eval-every", "1000", "--checkpoint-dir", str(checkpoints),
             "--resume", str(checkpoints), "--metrics-file", str(metrics))
    first = servers(*flags, name="first")
    with WorkerClient(first.address, timeout=30) as client:
        client.join()
        version, theta = client.pull()
        for _ in range(3):
            _, version, theta = client.push_pull(torch.zeros_like(theta), version)
        client.leave()
    first.proc.send_signal(signal.SIGTERM)
    assert first.wait(timeout=60) == 0, first.log()
    second = servers(*flags, name="second")  # resumes at version 3 and ends on SIGTERM without a push
    second.proc.send_signal(signal.SIGTERM)
    assert second.wait(timeout=60) == 0, second.log()

    written = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [(r["event"], r["incarnation"], r["version"]) for r in written] == [("final", 0, 3), ("final", 1, 3)]
    run, = read_runs(metrics)
    assert restarts(run) == [written[0]["time"]]
    assert run[1]["time"] == written[0]["time"] + written[1]["time"]
    _, gaps = mean_gaps(run)
    assert gaps[0] >= 1 and math.isnan(gaps[1]), "the resumed server saw no push: no Gap, not a Gap of 0"
    assert CliRunner().invoke(main, ["plot", str(metrics)]).exit_code == 0
    assert png_size(tmp_path / "metrics.png") == (2000, 800)
