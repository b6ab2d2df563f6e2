"""The evaluation a task defines: its own metrics, the defaults that fit its outputs, and a metrics
function that raises without stopping training or the server."""
from __future__ import annotations

import json
import math

import torch

from gapaware.common.config import RunConfig
from tests import metric_tasks
from tests.waiting import wait_for
from gapaware.processes import ServerProcess, start_worker
from gapaware.server.build import build_state
from gapaware.server.evaluator import Evaluator, MetricsLog
from gapaware.worker.client import WorkerClient


def _evaluate(task: str, tmp_path) -> dict:
    config = RunConfig(task=task, max_updates=10, batch_size=16)
    task_, state = build_state(config)
    return Evaluator(state, task_, MetricsLog(tmp_path / "metrics.jsonl")).evaluate_now()


def test_a_regression_reports_its_own_metric_and_no_accuracy(tmp_path):
    record = _evaluate("tests.metric_tasks:regression", tmp_path)
    assert record["eval_metrics"] == ["loss", "mae"]
    assert record["mae"] > 0 and record["loss"] > 0 and math.isnan(record["accuracy"])
    assert "eval_error" not in record


def test_a_sequence_model_reports_perplexity_and_its_own_metric(tmp_path):
    record = _evaluate("tests.metric_tasks:sequence", tmp_path)
    assert record["eval_metrics"] == ["loss", "perplexity", "token_accuracy"]
    assert math.isclose(record["perplexity"], math.exp(record["loss"]))
    assert 0 <= record["token_accuracy"] <= 1 and math.isnan(record["accuracy"])


def _stop(*procs) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_server_trains_a_regression_and_logs_its_metric(tmp_path):
    server = ServerProcess(tmp_path, "--task", "tests.metric_tasks:regression", "--max-updates", "150",
                           "--eval-every", "50", "--batch-size", "16", "--lr", "0.05", "--momentum", "0")
    worker = start_worker(server.address, tmp_path, 0, "--threads", "1")
    try:
        assert server.wait(timeout=120) == 0, server.log()
    finally:
        _stop(worker, server.proc)
    initial, final = _evaluate("tests.metric_tasks:regression", tmp_path), server.records("final")[-1]
    assert final["version"] == 150 and final["mae"] < initial["mae"] / 10, (initial, final)
    assert "mae" in server.log()


def test_a_metrics_function_that_raises_is_reported_and_training_goes_on(tmp_path):
    server = ServerProcess(tmp_path, "--task", "tests.metric_tasks:raising", "--max-updates", "400",
                           "--eval-every", "20", "--batch-size", "16", "--lr", "0.05")
    worker = start_worker(server.address, tmp_path, 0, "--threads", "1")
    try:
        with WorkerClient(server.address, timeout=10) as client:
            status = wait_for(lambda: (s := client.status()).eval_errors and s, 120, server.log, alive=server.proc)
        assert status.last_eval_error == "RuntimeError: the user's evaluation code is broken"
        assert server.wait(timeout=120) == 0, server.log()
        assert worker.wait(timeout=60) == 0
    finally:
        _stop(worker, server.proc)
    final = server.records("final")[-1]
    assert final["version"] == 400 and final["eval_error"] == status.last_eval_error
    assert final["eval_errors"] == len(server.records()) >= 2
    assert "Traceback" in server.log() and "the user's evaluation code is broken" in server.log()


def test_evaluations_that_updates_outpace_are_counted_as_skipped_with_the_reason(tmp_path):
    config = RunConfig(task="tests.metric_tasks:held", max_updates=100, batch_size=16, eval_every=2)
    task, state = build_state(config)
    evaluator = Evaluator(state, task, MetricsLog(tmp_path / "metrics.jsonl"))
    worker = state.join("test", "cpu", None).worker_id

    def update() -> None:
        version, _ = state.pull(worker)
        state.push(state.admit(worker, torch.zeros(state.layout.numel), base_version=version))

    evaluator.start()
    try:
        update(), update()
        assert metric_tasks.EVALUATING.wait(timeout=30)  # evaluating version 2 (or later)
        for _ in range(7):
            update()  # versions 3 to 9 arrive while it evaluates: 4 and 6 are skipped, 8 is evaluated at 9
        metric_tasks.RELEASE.set()
        wait_for(lambda: evaluator.last["version"] >= 9, 30, lambda: f"version 9 evaluated: {evaluator.last}",
                 interval=0.01)
    finally:
        metric_tasks.RELEASE.set()
        state.finish()
        evaluator.stop()
    first, second = (json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()[:2])
    assert second["version"] == 9 and second["evals_skipped"] == 9 // 2 - first["version"] // 2 - 1 >= 2
    assert "updates outpaced evaluation" in second["skip_reason"] and "skip_reason" not in first
