"""Checkpoints under faults and tampering: a full disk does not stop the run or its checkpoints for
good, junk and tampered files are neither resumed nor trusted, and a supervisor's one command line
works from a fresh host on."""
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import uuid
from pathlib import Path

import pytest
import torch

from gapaware import WorkerClient
from gapaware.command_line import gapaware_command
from gapaware.processes import log_tail, spawn, start_worker
from gapaware.server import checkpoint as checkpoint_module
from gapaware.server.checkpoint import (CheckpointDirectory, CheckpointWriteError, CorruptCheckpoint, read_checkpoint,
                                        write_checkpoint)
from gapaware.server.checkpointer import Checkpointer, CheckpointOptions
from gapaware.server.registry import IDS_PER_INCARNATION, first_worker_id
from gapaware.server.resume import ResumeError, find_resume_point, next_incarnation, resolve_config
from tests.test_checkpoint import drive, make_state, saved  # noqa: F401  saved: a fixture
from tests.test_observability import free_port, scrape
from tests.waiting import wait_for

OUT_OF_RANGE_JUNK = "checkpoint-i20000000000000-v0.safetensors"
IN_RANGE_JUNK = "checkpoint-i999999999-v0.safetensors"


def test_the_largest_incarnation_keeps_worker_ids_inside_64_bits():
    assert first_worker_id(checkpoint_module.MAX_INCARNATION + 1) + IDS_PER_INCARNATION < 2**64


def test_junk_files_are_neither_resumed_nor_move_the_incarnation_nor_displace_new_checkpoints(saved, caplog):
    for name in (OUT_OF_RANGE_JUNK, IN_RANGE_JUNK):
        (saved.path / name).write_bytes(b"junk")
    checkpoint = find_resume_point(saved.path)
    assert checkpoint.version == 9
    assert f"ignoring {saved.path / OUT_OF_RANGE_JUNK}: its incarnation or version is out of range" in caplog.text
    assert f"skipping checkpoint {saved.path / IN_RANGE_JUNK}" in caplog.text
    assert next_incarnation(checkpoint, saved.path, saved.path) == 1

    saved.keep = 1
    state = make_state("gap-aware")
    state.restore(checkpoint, incarnation=1)
    written = saved.save(state.checkpoint())
    assert written.exists(), "a junk file that sorts after it must not get the new checkpoint pruned"
    assert sorted(p.name for p in saved.path.iterdir()) == sorted([written.name, OUT_OF_RANGE_JUNK, IN_RANGE_JUNK])


def tampered(directory: Path, checkpoint, **changes) -> Path:
    """``checkpoint`` written with ``changes`` (fields of the checkpoint, or ``lr``) and a checksum
    recomputed over them, as an attacker with write access to the directory could."""
    config = checkpoint.config
    if "lr" in changes:
        object.__setattr__(config := type(config)(**{**config.__dict__}), "lr", changes.pop("lr"))
    forged = type(checkpoint)(**{**checkpoint.__dict__, "config": config, **changes})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoint_module, "nonfinite_tensors", lambda _: [])
        return write_checkpoint(directory, forged)


@pytest.mark.parametrize("change, refusal", [
    ({"theta": "nan"}, "theta hold NaN or Inf"),
    ({"policy_state": "inf"}, "policy/ga.v hold NaN or Inf"),
    ({"lr": 1e30}, "Invalid learning rate: 1e[+]30 [(]at most 1000[)]"),
    ({"samples": 2**64}, "out of range"),
    ({"incarnation": 20_000_000_000_000}, "incarnation 20000000000000 is out of range"),
])
def test_a_tampered_checkpoint_is_refused_and_the_newest_valid_one_resumed(saved, tmp_path, change, refusal):
    newest = read_checkpoint(saved.paths()[-1])
    changes = dict(change)
    if changes.get("theta") == "nan":
        changes["theta"] = torch.full_like(newest.theta, math.nan)
    if changes.get("policy_state") == "inf":
        changes["policy_state"] = {**newest.policy_state,
                                   "ga.v": torch.full_like(newest.policy_state["ga.v"], math.inf)}
    if "incarnation" not in changes:
        changes["version"] = 10
    forged = tampered(tmp_path, newest, **changes)
    with pytest.raises(CorruptCheckpoint, match=refusal):
        read_checkpoint(forged)
    if "incarnation" not in changes:
        shutil.move(forged, saved.path / forged.name)
        assert find_resume_point(saved.path).version == 9


def test_a_checkpoint_whose_name_does_not_match_its_content_is_refused(saved):
    newest = saved.paths()[-1]
    renamed = newest.rename(newest.with_name("checkpoint-i0000-v0000000012.safetensors"))
    with pytest.raises(CorruptCheckpoint, match="named for incarnation 0, version 12 but holding incarnation 0, "
                                                "version 9"):
        read_checkpoint(renamed)


def test_a_state_holding_nan_is_not_written(tmp_path):
    state = make_state("asgd")
    state.theta[3] = math.nan
    with pytest.raises(CheckpointWriteError, match="theta hold NaN or Inf: not written"):
        CheckpointDirectory(tmp_path).save(state.checkpoint())
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_may_name_only_a_builtin_task_or_the_one_given():
    saved = make_state("asgd").config
    foreign = type(saved)(**{**saved.__dict__, "task": "evil:build"})
    with pytest.raises(ResumeError, match="cannot make the server import code: pass --task evil:build"):
        resolve_config(foreign, saved, frozenset())
    assert resolve_config(foreign, foreign, frozenset({"task"})).task == "evil:build"


def test_a_tampered_checkpoint_does_not_make_a_real_server_import_its_module(tmp_path):
    marker = tmp_path / "imported"
    (tmp_path / "evilmod.py").write_text(f"open({str(marker)!r}, 'w').close()\nbuild = None\n")
    state = make_state("asgd")
    object.__setattr__(state.config, "task", "evilmod:build")
    CheckpointDirectory(tmp_path / "ckpt").save(state.checkpoint())
    done = subprocess.run(gapaware_command("server", "--resume", str(tmp_path / "ckpt"), "--port", "0"),
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert done.returncode == 4, done.stdout + done.stderr  # ExitCode.CANNOT_RUN
    assert "cannot make the server import code: pass --task evilmod:build" in done.stderr
    assert "Traceback" not in done.stderr
    assert not marker.exists(), "the module a checkpoint names was imported"


def test_the_checkpointer_counts_failures_logs_each_reason_once_and_resumes(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="gapaware.server.checkpoint")
    state = make_state("gap-aware")
    worker = state.join("h", "cpu", None).worker_id
    blocked = tmp_path / "ckpt"
    blocked.write_text("a file where the directory should be")
    checkpointer = Checkpointer(state, CheckpointOptions(blocked, every_updates=1, keep=2))
    checkpointer.start()
    try:
        for step in range(4):
            drive(state, [worker], steps=1, seed=step)
            wait_for(lambda: state.checkpoint_health.failures > step, 10, "a failed write")
        health = state.checkpoint_health
        assert health.failures == 4 and health.version == -1 and "File exists" in health.last_error
        errors = [r for r in caplog.records if r.levelno == logging.ERROR and "could not write" in r.message]
        assert len(errors) == 1, "each reason is logged once, not at every attempt"
        assert checkpointer._thread.is_alive()
        blocked.unlink()
        drive(state, [worker], steps=1, seed=9)
        wait_for(lambda: health.version == state.version, 10, "the checkpoints to resume")
    finally:
        checkpointer.stop()
    assert read_checkpoint(CheckpointDirectory(blocked).paths()[-1]).version == 5
    assert "checkpoints resume after 4 failed writes" in caplog.text


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs of its own, unmounted at the end (skipped where mounting is not permitted)."""
    mount_point = tmp_path / f"disk-{uuid.uuid4().hex[:8]}"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root or CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)
        if subprocess.run(["mountpoint", "-q", str(mount_point)]).returncode == 0:
            subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(disk: Path) -> Path:
    """Writes a file until ``disk`` has no space left; returns it."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as out, contextlib.suppress(OSError):
        while True:
            out.write(b"\0" * 4096)
    assert shutil.disk_usage(disk).free < 4096, "the disk is not full"
    return filler


@pytest.mark.slow
def test_a_full_disk_stops_neither_training_nor_checkpoints_for_good(small_disk, servers, tmp_path):
    metrics_port = free_port()
    directory = CheckpointDirectory(small_disk / "ckpt")
    server = servers("--task", "digits-mlp", "--max-updates", "1000000", "--eval-every", "1000000",
                     "--checkpoint-dir", str(directory.path), "--checkpoint-every", "50", "--checkpoint-seconds", "0",
                     "--keep-checkpoints", "2", "--metrics-port", str(metrics_port))
    worker = start_worker(server.address, tmp_path, 0)
    try:
        with WorkerClient(server.address, timeout=30) as client:
            wait_for(lambda: client.status().checkpoint_version >= 100, 120, "periodic checkpoints")
            filler = fill(small_disk)
            full_at = client.status()
            failing = wait_for(lambda: (s := client.status()).checkpoint_failures >= 3 and s, 60, "failed writes")
            assert failing.version > full_at.version, "training goes on"
            assert "No space left on device" in failing.last_checkpoint_error
            assert failing.checkpoint_version <= full_at.version + 50
            assert scrape(metrics_port)[("gapaware_checkpoint_failures_total", ())] >= 3
            assert server.log().count("could not write checkpoint") <= 2 < failing.checkpoint_failures, \
                "each reason is logged once"
            assert worker.poll() is None

            filler.unlink()
            resumed = wait_for(lambda: (s := client.status()).checkpoint_version > failing.version and s, 60,
                               "the checkpoints to resume")
            newest = read_checkpoint(directory.paths()[-1])
            assert newest.version >= resumed.checkpoint_version
            assert "checkpoints resume after" in server.log()

            fill(small_disk)
            server.proc.send_signal(signal.SIGTERM)
            assert server.wait(timeout=60) == 6, log_tail(server.log_path)
        assert "the run ended, but its final checkpoint was not written" in server.log()
        final = server.records("final")
        assert final and math.isfinite(final[0]["accuracy"]), "the final evaluation is written all the same"
        assert worker.wait(timeout=60) == 0
    finally:
        if worker.poll() is None:
            worker.kill()


def start_server(*flags: str, workdir: Path) -> tuple[subprocess.Popen, dict, Path]:
    ready, log_path = workdir / "server.ready", workdir / f"server-{uuid.uuid4().hex[:6]}.log"
    ready.unlink(missing_ok=True)
    proc = spawn(gapaware_command("server", "--port", "0", "--ready-file", str(ready), "--linger", "1", *flags),
                 log_path)
    ready_json = wait_for(lambda: _json(ready) or proc.poll() is not None, 120, "the server")
    assert proc.poll() is None, log_tail(log_path)
    return proc, ready_json, log_path


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def test_one_unchanging_command_line_starts_a_run_on_a_fresh_host_and_resumes_it(tmp_path):
    directory = tmp_path / "fresh-host" / "ckpt"
    command = ("--task", "digits-mlp", "--max-updates", "50", "--checkpoint-dir", str(directory),
               "--resume", str(directory))
    proc, _, log_path = start_server(*command, workdir=tmp_path)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, log_tail(log_path)
    assert "no such directory yet, starting a new run" in log_path.read_text()
    assert [read_checkpoint(p).incarnation for p in CheckpointDirectory(directory).paths()] == [0]

    for name in (OUT_OF_RANGE_JUNK, IN_RANGE_JUNK):
        (directory / name).write_bytes(b"junk")
    proc, ready, log_path = start_server(*command, workdir=tmp_path)
    try:
        with WorkerClient(f"127.0.0.1:{ready['port']}", timeout=30) as client:
            assert client.join().worker_id == first_worker_id(1), "the junk did not move the incarnation"
            client.leave()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log_tail(log_path)
    assert "resuming from" in log_path.read_text()


def test_a_missing_resume_directory_starts_a_run_only_when_it_is_the_checkpoint_directory(tmp_path):
    missing = tmp_path / "missing"
    assert find_resume_point(missing, checkpoint_dir=tmp_path / "." / "missing") is None
    with pytest.raises(ResumeError, match="no such directory [(]a missing one starts a new run only when it is also "
                                          "--checkpoint-dir[)]"):
        find_resume_point(missing, checkpoint_dir=tmp_path / "elsewhere")
    with pytest.raises(ResumeError, match="no such directory"):
        find_resume_point(missing)
