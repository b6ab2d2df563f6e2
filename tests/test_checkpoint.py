"""Checkpoints: exact round trips of the server state, atomic files, corruption detected, resume rules."""
import os
import threading
import time

import pytest
import torch

from gapaware.common.config import RunConfig
from gapaware.common.layout import ParamLayout
from gapaware.server.checkpointer import Checkpointer, CheckpointOptions
from gapaware.server.checkpoint import CheckpointDirectory, CorruptCheckpoint, read_checkpoint, write_checkpoint
from gapaware.server.registry import first_worker_id
from gapaware.server.resume import ResumeError, check_fresh_directory, find_resume_point, resolve_config
from gapaware.server.state import ParameterServerState
from gapaware.server.policies import POLICIES
from tests.waiting import wait_for

NUMEL = 50


def make_state(policy: str, **config) -> ParameterServerState:
    layout = ParamLayout(("w",), ((NUMEL,),))
    config = RunConfig(task="digits-mlp", policy=policy, max_updates=100, momentum=0.9, **config)
    return ParameterServerState(config, layout, torch.linspace(-1, 1, NUMEL), train_size=1000)


def drive(state: ParameterServerState, workers: list[int], steps: int, seed: int) -> None:
    """Interleaved pulls and pushes of deterministic gradients: stale pushes for every policy."""
    gen = torch.Generator().manual_seed(seed)
    versions = {w: state.pull(w)[0] for w in workers}
    for step in range(steps):
        worker = workers[step % len(workers)]
        state.push(state.admit(worker, torch.randn(NUMEL, generator=gen), base_version=versions[worker], samples=32, loss=0.5))
        versions[worker] = state.pull(worker)[0]


@pytest.mark.parametrize("policy", [p for p in POLICIES if p not in ("dana", "dana-ga")])
def test_a_restored_state_continues_exactly_like_the_original(policy, tmp_path):
    original = make_state(policy)
    ids = [original.join("h", "cpu", None).worker_id for _ in range(3)]
    drive(original, ids, steps=12, seed=1)
    path = write_checkpoint(tmp_path, original.checkpoint())

    restored = make_state(policy)
    restored.restore(read_checkpoint(path), incarnation=1)
    assert restored.version == original.version == 12 and restored.samples == 12 * 32
    assert restored.totals() == original.totals()
    assert torch.equal(restored.theta, original.theta)

    new_ids = [restored.join("h", "cpu", None).worker_id for _ in range(3)]
    assert new_ids == [first_worker_id(1) + i for i in range(3)], "a new incarnation's ids never repeat old ones"
    for state, workers in ((original, ids), (restored, new_ids)):
        drive(state, workers, steps=9, seed=2)
    assert torch.equal(restored.theta, original.theta), "momentum, GA's v, k and η_max must all be restored"


@pytest.mark.parametrize("policy", ["dana", "dana-ga"])
def test_dana_buffers_of_the_crashed_server_are_dropped_on_restore(policy, tmp_path):
    original = make_state(policy)
    ids = [original.join("h", "cpu", None).worker_id for _ in range(2)]
    drive(original, ids, steps=6, seed=1)
    checkpoint = read_checkpoint(write_checkpoint(tmp_path, original.checkpoint()))
    assert {f"dana.v.{i}" for i in ids} <= set(checkpoint.policy_state), "the checkpoint holds the buffers"

    restored = make_state(policy)
    restored.restore(checkpoint, incarnation=1)
    assert restored.policy.worker_ids() == []
    assert torch.count_nonzero(restored.policy.buffer_sum) == 0
    worker = restored.join("h", "cpu", None).worker_id
    assert torch.equal(restored.pull(worker)[1], original.theta), "no look-ahead from departed workers' momentum"


def test_restore_refuses_another_model_or_policy(tmp_path):
    path = write_checkpoint(tmp_path, make_state("gap-aware").checkpoint())
    with pytest.raises(ValueError, match="Missing key in policy state"):
        make_state("dana").restore(read_checkpoint(path), incarnation=1)
    other_model = ParameterServerState(make_state("gap-aware").config, ParamLayout(("w",), ((7,),)),
                                       torch.zeros(7), train_size=1000)
    with pytest.raises(ValueError, match="holds 50 parameters"):
        other_model.restore(read_checkpoint(path), incarnation=1)


@pytest.fixture
def saved(tmp_path):
    """A directory with checkpoints at versions 3, 6 and 9 of one run."""
    state = make_state("gap-aware")
    worker = state.join("h", "cpu", None).worker_id
    directory = CheckpointDirectory(tmp_path / "ckpt", keep=5)
    for _ in range(3):
        drive(state, [worker], steps=3, seed=state.version)
        directory.save(state.checkpoint())
    return directory


def test_truncated_newest_checkpoint_is_skipped_for_the_previous_one(saved, caplog):
    newest = saved.paths()[-1]
    os.truncate(newest, newest.stat().st_size - 100)
    checkpoint = find_resume_point(saved.path)
    assert checkpoint.version == 6
    assert f"skipping checkpoint {newest}" in caplog.text


def test_a_flipped_byte_is_detected(saved):
    newest = saved.paths()[-1]
    data = bytearray(newest.read_bytes())
    data[-5] ^= 0x10
    newest.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint, match="checksum mismatch"):
        read_checkpoint(newest)
    assert find_resume_point(saved.path).version == 6


def test_only_corrupt_checkpoints_refuse_to_resume_and_change_nothing(saved):
    for path in saved.paths():
        path.write_bytes(b"\0" * 64)
    with pytest.raises(ResumeError, match="none of its 3 checkpoint files is valid"):
        find_resume_point(saved.path)
    assert len(saved.paths()) == 3


def test_only_the_newest_k_are_kept_and_partial_writes_are_ignored(saved):
    saved.keep = 2
    state = make_state("gap-aware")
    state.restore(read_checkpoint(saved.paths()[-1]), incarnation=1)
    (saved.path / "checkpoint-i0009-v0000000099.safetensors.tmp").write_bytes(b"torn")
    saved.save(state.checkpoint())
    names = [p.name for p in saved.paths()]
    assert names == ["checkpoint-i0000-v0000000009.safetensors", "checkpoint-i0001-v0000000009.safetensors"]
    saved.remove_partial_writes()
    assert sorted(p.name for p in saved.path.iterdir()) == names


def test_a_new_run_refuses_a_directory_holding_another_runs_checkpoints(saved, tmp_path):
    with pytest.raises(ResumeError, match="pass --resume"):
        check_fresh_directory(saved.path)
    check_fresh_directory(tmp_path / "empty")
    assert find_resume_point(tmp_path) is None


def test_resumed_config_takes_explicit_flags_but_not_another_task():
    saved = RunConfig(task="digits-mlp", policy="gap-aware", max_updates=300, lr=0.1)
    given = RunConfig(task="digits-cnn", policy="asgd", max_updates=600, lr=0.05)
    resumed = resolve_config(saved, given, frozenset({"max_updates"}))
    assert (resumed.task, resumed.max_updates, resumed.lr) == ("digits-mlp", 600, 0.1)
    with pytest.raises(ResumeError, match="task 'digits-mlp'"):
        resolve_config(saved, given, frozenset({"task"}))


def test_checkpointer_writes_every_n_updates_and_every_s_seconds(tmp_path):
    state = make_state("gap-aware")
    worker = state.join("h", "cpu", None).worker_id
    by_updates = Checkpointer(state, CheckpointOptions(tmp_path / "u", every_updates=5, keep=10))
    by_updates.start()
    for _ in range(12):
        drive(state, [worker], steps=1, seed=state.version)
        wait_for(lambda: len(by_updates.directory.paths()) >= state.version // 5, 10,  # before the next push
                 f"the checkpoint thread to write version {state.version // 5 * 5}", interval=0.02)
    by_updates.stop()
    versions = [read_checkpoint(p).version for p in by_updates.directory.paths()]
    assert versions == [5, 10], versions

    by_time = Checkpointer(state, CheckpointOptions(tmp_path / "s", every_seconds=0.2, keep=10))
    by_time.start()
    for _ in range(4):
        drive(state, [worker], steps=1, seed=state.version)
        time.sleep(0.5)
    by_time.stop()
    timed = [read_checkpoint(p).version for p in by_time.directory.paths()]
    assert len(timed) >= 2 and timed == sorted(set(timed)) and 0 < timed[0], timed


def test_a_thread_waiting_for_a_version_is_woken_when_it_is_reached_not_by_every_push():
    """The checkpointer and the evaluator wait for a version; waking them on every push cost the
    push a thread switch on the server's event loop."""
    state = make_state("gap-aware")
    worker = state.join("h", "cpu", None).worker_id
    wakes = []
    notify_all = state._changed.notify_all
    state._changed.notify_all = lambda: (wakes.append(state.version), notify_all())
    reached = []
    waiter = threading.Thread(target=lambda: reached.append(state.wait_for_version(3, timeout=30)))
    waiter.start()
    wait_for(lambda: state._changed._waiters, 10, "the waiter to wait", interval=0.01)
    drive(state, [worker], steps=3, seed=0)
    waiter.join(timeout=30)
    drive(state, [worker], steps=2, seed=3)
    assert reached == [3] and wakes == [3], (reached, wakes)
    state.finish()
    assert wakes == [3, 5], "finishing the run wakes every waiter"
