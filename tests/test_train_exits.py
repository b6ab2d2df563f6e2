"""``gapaware train`` stops the server and fails when every worker has exited before the end."""
from __future__ import annotations

import subprocess

import pytest

from gapaware.command_line import gapaware_command


@pytest.mark.slow
def test_train_exits_with_the_workers_errors_when_they_all_die(tmp_path):
    run = subprocess.run(gapaware_command("train", "--task", "tests.metric_tasks:crashes_in_training",
                                          "--workers", "2", "--max-updates", "100", "--out", str(tmp_path)),
                         capture_output=True, text=True, timeout=180)
    assert run.returncode != 0, run.stdout + run.stderr
    assert "every worker exited before the run ended" in run.stderr, run.stderr
    assert run.stderr.count("this model cannot train") >= 2, run.stderr
    assert "worker 0 (exit 1" in run.stderr and "worker 1 (exit 1" in run.stderr
