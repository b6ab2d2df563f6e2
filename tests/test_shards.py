"""Sharded servers (``--shard I/S``): the split, the identity checks and bit-exactness against one server."""
from __future__ import annotations

import signal
import subprocess
import threading

import grpc
import pytest
import torch

from gapaware.command_line import gapaware_command
from gapaware.common.config import RunConfig
from gapaware.common.layout import ParamLayout
from gapaware.common.registry import POLICY_NAMES
from gapaware.common.shards import BALANCE_TOLERANCE, Shard, shard_cuts, shard_layout
from gapaware.common.tasks import load_task
from gapaware.processes import ServerProcess, start_worker
from gapaware.server.app import ServerOptions, prepare_state
from gapaware.server.build import build_state
from gapaware.server.checkpointer import CheckpointOptions
from gapaware.server.resume import ResumeError
from gapaware.worker.client import WorkerClient
from gapaware.worker.loop import WorkerOptions, run_worker
from gapaware.worker.sharded import ShardedClient
from tests.waiting import wait_for


def test_cuts_fall_on_tensors_when_that_balances_and_on_elements_otherwise():
    balanced = ParamLayout(("a", "b", "c", "d"), ((100,), (10, 10), (95,), (105,)))
    assert shard_cuts(balanced, 2) == [0, 200, 400]
    lopsided = ParamLayout(("embedding", "bias"), ((1000,), (10,)))
    assert shard_cuts(lopsided, 2) == [0, 505, 1010]
    assert shard_cuts(lopsided, 3) == [0, 336, 673, 1010]
    nearly = ParamLayout(("a", "b"), ((100 - int(BALANCE_TOLERANCE * 100),), (100 + int(BALANCE_TOLERANCE * 100),)))
    assert shard_cuts(nearly, 2) == [0, 90, 200]


def test_a_shard_layout_names_the_model_and_range_and_only_shard_0_holds_buffers():
    model = ParamLayout(("w",), ((10,),))
    first, second = (shard_layout(model, Shard(i, 2)) for i in range(2))
    assert first.shapes == ((5,),) and second.shapes == ((5,),)
    assert first.fingerprint != second.fingerprint
    assert "1/2" in second.names[0] and model.fingerprint[:16] in second.names[0]
    assert shard_layout(model, Shard()) == model


@pytest.mark.parametrize("text", ["2/2", "1", "a/b", "-1/2", "0/0"])
def test_a_bad_shard_is_refused(text):
    with pytest.raises(ValueError, match="Invalid shard"):
        Shard.parse(text)


def _config(policy: str, **changes) -> RunConfig:
    settings = dict(task="synthetic", policy=policy, lr=0.05, momentum=0.9, schedule="constant", max_updates=12,
                    batch_size=16, eval_every=1000, seed=3)
    return RunConfig(**{**settings, **changes})


def _train(inprocess_servers, config: RunConfig, count: int) -> list:
    states = [build_state(config, shard=Shard(i, count))[1] for i in range(count)]
    servers = [inprocess_servers(state) for state in states]
    summary = run_worker(WorkerOptions(server=",".join(s.address for s in servers), prefetch_batches=0,
                                       progress_every=0))
    assert summary.applied == config.max_updates
    return states


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_two_and_three_shards_end_bit_identical_to_one_server(inprocess_servers, policy):
    config = _config(policy)
    single = _train(inprocess_servers, config, 1)[0]
    for count in (2, 3):
        states = _train(inprocess_servers, config, count)
        assert [s.version for s in states] == [config.max_updates] * count
        assert torch.equal(torch.cat([s.theta for s in states]), single.theta), f"{count} shards differ"
        assert states[0].finished and all(s.finished for s in states[1:])  # told at the worker's Leave


@pytest.mark.parametrize("policy", ["gap-aware", "dana-ga"])
def test_parameter_groups_split_over_shards_as_over_the_model(inprocess_servers, policy):
    """A shard's layout is one nameless slice, so its weight-decay and learning-rate groups come from
    the whole model's: skipping biases (one dimension each) and scaling the last layer's rate split
    over 2 and 3 shards end bit-identical to one server, and unlike a run without them."""
    config = _config(policy, weight_decay=0.05, weight_decay_skip_bias_norm=True, lr_scale=(("2.*", 3.0),))
    single = _train(inprocess_servers, config, 1)[0]
    plain = _train(inprocess_servers, _config(policy, weight_decay=0.05), 1)[0]
    assert not torch.equal(single.theta, plain.theta)
    for count in (2, 3):
        states = _train(inprocess_servers, config, count)
        assert torch.equal(torch.cat([s.theta for s in states]), single.theta), f"{count} shards differ"


def test_shards_of_another_run_or_listed_out_of_order_refuse_the_worker(inprocess_servers):
    first = inprocess_servers(build_state(_config("gap-aware"), shard=Shard(0, 2))[1])
    other_run = inprocess_servers(build_state(_config("gap-aware", seed=4), shard=Shard(1, 2))[1])
    second = inprocess_servers(build_state(_config("gap-aware"), shard=Shard(1, 2))[1])
    layout = ParamLayout.from_module(_task_model())
    with ShardedClient([first.address, other_run.address]) as client, pytest.raises(grpc.RpcError) as refused:
        client.join(layout)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "another run" in refused.value.details()
    with ShardedClient([second.address, first.address]) as client, pytest.raises(grpc.RpcError) as refused:
        client.join(layout)
    assert "shard 1/2 of a sharded run" in refused.value.details()
    with WorkerClient(first.address) as client, pytest.raises(grpc.RpcError) as refused:
        client.join(layout)
    assert "give the worker every shard" in refused.value.details()


def _task_model():
    return load_task("synthetic", seed=3).model


def test_a_shard_refuses_checkpoints_of_another_shard(tmp_path):
    config = _config("gap-aware")
    checkpoints = CheckpointOptions(tmp_path)
    prepare_state(config, ServerOptions(checkpoints=checkpoints, shard=Shard(1, 2)))
    with pytest.raises(ResumeError, match=r"the checkpoint is of shard 1/2 .* started as shard 0/3: give --shard 1/2"):
        prepare_state(config, ServerOptions(checkpoints=checkpoints, resume=tmp_path, shard=Shard(0, 3)))
    with pytest.raises(ResumeError, match=r"shard 1/2 .* started as shard 0/1"):
        prepare_state(config, ServerOptions(checkpoints=checkpoints, resume=tmp_path))


def test_a_shard_restarted_alone_from_its_checkpoint_is_rejoined_alone_and_the_run_completes(inprocess_servers,
                                                                                              caplog):
    config = _config("gap-aware", max_updates=150)
    states = [build_state(config, shard=Shard(i, 2))[1] for i in range(2)]
    servers = [inprocess_servers(state) for state in states]
    summaries = []
    worker = threading.Thread(target=lambda: summaries.append(run_worker(WorkerOptions(
        server=",".join(s.address for s in servers), prefetch_batches=0, progress_every=0))))
    worker.start()
    assert states[1].wait_for_version(20, timeout=60) >= 20
    saved = states[1].checkpoint()
    servers[1].close()
    restarted = build_state(config, shard=Shard(1, 2))[1]
    restarted.restore(saved, incarnation=1)
    inprocess_servers(restarted, port=servers[1].port)
    worker.join(timeout=120)
    assert summaries and summaries[0].joins == 1
    assert states[0].version == config.max_updates and restarted.finished
    assert "shard 1 " in caplog.text and "shard 0 " not in caplog.text
    for state in (states[0], restarted):
        assert state.version == state.totals()["pushes"]


@pytest.mark.slow
def test_a_shard_process_sigkilled_and_resumed_alone_lets_the_run_complete(tmp_path):
    """Real processes: two shards checkpointing every 5 updates and one worker; shard 1 is SIGKILLed
    mid-run and started again on its port with --resume; the run ends, and every shard's update count is
    the pushes it applied (those of its checkpoint and those after the restart)."""
    run = ("--task", "digits-mlp", "--max-updates", "300", "--eval-every", "100000", "--lease-seconds", "5")
    flags = [(*run, "--shard", f"{i}/2", "--checkpoint-dir", str(tmp_path / f"shard-{i}"), "--checkpoint-every", "5",
              "--resume", str(tmp_path / f"shard-{i}")) for i in range(2)]
    shards = [ServerProcess(tmp_path, *flags[i], name=f"shard-{i}") for i in range(2)]
    restarted = None
    worker = start_worker(",".join(s.address for s in shards), tmp_path, 0, "--retry-max-backoff", "1")
    try:
        with WorkerClient(shards[1].address) as client:
            wait_for(lambda: client.status().version >= 30, 120, "shard 1 to pass update 30")
        shards[1].proc.send_signal(signal.SIGKILL)
        shards[1].wait(timeout=30)
        restarted = ServerProcess(tmp_path, *flags[1], "--port", str(shards[1].port), name="shard-1-again")
        assert worker.wait(timeout=180) == 0, (tmp_path / "worker-0.log").read_text()
        assert shards[0].wait(timeout=60) == 0 and restarted.wait(timeout=60) == 0
        first, second = shards[0].records("final")[-1], restarted.records("final")[-1]
        assert first["version"] == 300 and first["pushes"] == 300
        assert 30 <= second["version"] == second["pushes"] <= 300
        assert "resuming from" in restarted.log()
        assert "shard 1 (" in (tmp_path / "worker-0.log").read_text()  # joined shard 1 again, alone
    finally:
        for proc in (worker, *(s.proc for s in shards), *([restarted.proc] if restarted else [])):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_gapaware_evaluate_observes_a_sharded_run_and_reports_to_shard_0(servers, tmp_path):
    run = ("--task", "digits-mlp", "--max-updates", "200", "--lr", "0.1")
    shards = [servers(*run, "--shard", f"{i}/2", name=f"shard-{i}") for i in range(2)]
    addresses = ",".join(s.address for s in shards)
    evaluate = subprocess.Popen(gapaware_command("evaluate", "--server", addresses, "--every", "50"),
                                stdout=(tmp_path / "evaluate.log").open("w"), stderr=subprocess.STDOUT)
    worker = start_worker(addresses, tmp_path, 0)
    assert worker.wait(timeout=180) == 0, (tmp_path / "worker-0.log").read_text()
    assert evaluate.wait(timeout=180) == 0, (tmp_path / "evaluate.log").read_text()
    reported = [r for r in shards[0].records("eval") if r.get("reported")]
    assert reported and reported[-1]["version"] == 200 and reported[-1]["accuracy"] > 0.8, reported
