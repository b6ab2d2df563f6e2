"""``gapaware plot`` turns a metrics file into a PNG, and says what is wrong with a bad file."""
import json
import struct

from click.testing import CliRunner

from gapaware.cli import main
from gapaware.plot import read_runs, staleness_histogram


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
    assert png_size(tmp_path / "metrics.png") == (1500, 800)
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
    assert png_size(out) == (1500, 800)


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
