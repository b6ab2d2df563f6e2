"""``gapaware server --init from-worker``: a server with none of the user's code takes the model from the
first worker, evaluation is reported from where the code is, and the run checkpoints, resumes and exports."""
from __future__ import annotations

import difflib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file

from gapaware.command_line import gapaware_command
from gapaware.common.buffers import checksum, model_buffers
from gapaware.common.evaluation import evaluate_task
from gapaware.common.layout import ParamLayout, flat_parameters
from gapaware.common.transport import encode
from gapaware.proto import parameter_server_pb2 as pb
from gapaware.worker.client import WorkerClient
from tests import bn_task

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TIMEOUT = 240


def run(argv: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})


def finish(procs: list[subprocess.Popen], logs: list[Path]) -> None:
    for proc, log in zip(procs, logs):
        assert proc.wait(timeout=TIMEOUT) == 0, log.read_text()[-3000:]


def test_the_converted_example_changes_at_most_five_lines():
    plain = (EXAMPLES / "digits_train.py").read_text().splitlines()
    converted = (EXAMPLES / "digits_train_gapaware.py").read_text().splitlines()
    changed = [line for line in difflib.ndiff(plain, converted) if line[:1] in "+-"]
    added, removed = sum(line[0] == "+" for line in changed), sum(line[0] == "-" for line in changed)
    assert 0 < max(added, removed) <= 5, "\n".join(changed)


def test_the_converted_example_trains_to_accuracy_against_a_server_with_no_user_code(servers, tmp_path):
    server = servers("--init", "from-worker", "--policy", "gap-aware", "--max-updates", "300", "--lr", "0.05")
    logs = [tmp_path / f"example-{i}.log" for i in range(2)]
    procs = [run([sys.executable, str(EXAMPLES / "digits_train_gapaware.py"), "--server", server.address], log)
             for log in logs]
    finish(procs, logs)
    assert server.wait(timeout=TIMEOUT) == 0, server.log()
    printed = [json.loads(log.read_text().strip().splitlines()[-1].replace("'", '"'))["accuracy"] for log in logs]
    reported = [r for r in server.records("eval") if r.get("reported")]
    final = [r["accuracy"] for r in reported if r["version"] == 300]
    assert min(printed) >= 0.93, printed
    assert final and all(abs(a - printed[0]) <= 1 / 450 for a in [*final, *printed]), (final, printed)
    assert len(reported) >= 4  # every 50 steps of each worker, and at the end
    assert "the model came from the worker" in server.log()


def test_a_user_task_trains_checkpoints_resumes_and_exports_without_the_server_importing_it(servers, tmp_path):
    """The task lives where the workers are (on their PYTHONPATH, not the server's): the server is started
    without it and still checkpoints, resumes and exports the model whole, BatchNorm statistics included."""
    user_code = tmp_path / "user"
    user_code.mkdir()
    (user_code / "my_task.py").write_text(Path(bn_task.__file__).read_text())
    env = {"PYTHONPATH": str(user_code)}
    checkpoints = tmp_path / "checkpoints"
    server = servers("--init", "from-worker", "--max-updates", "200", "--lr", "0.1", "--eval-every", "50",
                     "--checkpoint-dir", str(checkpoints), "--checkpoint-every", "50", "--lease-seconds", "60")
    logs = [tmp_path / "worker.log", tmp_path / "evaluate.log"]
    procs = [run(gapaware_command("worker", "--server", server.address, "--task", "my_task:task"), logs[0], env),
             run(gapaware_command("evaluate", "--server", server.address, "--task", "my_task:task"), logs[1], env)]
    finish(procs, logs)
    assert server.wait(timeout=TIMEOUT) == 0, server.log()
    reported = [r for r in server.records("eval") if r.get("reported")]
    assert reported and reported[-1]["version"] == 200, reported  # the last: the final parameters
    assert "my_task" not in server.log()

    exported = tmp_path / "model.safetensors"
    subprocess.run(gapaware_command("export", str(checkpoints), "-o", str(exported)), check=True, timeout=TIMEOUT)
    task = bn_task.task()
    task.model.load_state_dict(load_file(str(exported)))
    accuracy = evaluate_task(task, task.model)["accuracy"]
    assert abs(accuracy - reported[-1]["accuracy"]) <= 1 / len(task.test) and accuracy > 0.9

    resumed = servers("--resume", str(checkpoints), "--max-updates", "300", name="resumed")
    with WorkerClient(resumed.address) as client:
        status = client.status()
        assert (status.version, status.awaiting_model, status.parameters) == (200, False, task_layout().numel)
        client.join(task_layout())  # no model asked for: it came from the checkpoint
        version, theta = client.pull()
        assert version == 200 and torch.equal(theta, flat_parameters(task.model))


def task_layout() -> ParamLayout:
    return ParamLayout.from_module(bn_task.task().model)


def initial_push(reply: pb.JoinReply, theta: torch.Tensor, buffers: bytes, secret: bytes | None = None):
    tensor, chunks = encode(theta, pb.FLOAT32)
    header = pb.PushHeader(worker_id=0, worker_secret=reply.worker_secret if secret is None else secret,
                           tensor=tensor, initial=True, buffers=buffers, buffers_crc32c=checksum(buffers))
    return [pb.PushFrame(header=header), *chunks]


def push_initial(client: WorkerClient, frames) -> list:
    return list(client._push_frames(iter(frames), timeout=30))


def test_only_the_chosen_worker_sends_the_model_and_later_ones_must_match_it(servers):
    server = servers("--init", "from-worker", "--max-updates", "100")
    model = bn_task.task().model
    layout = ParamLayout.from_module(model)
    theta, buffers = flat_parameters(model), model_buffers(model, layout.buffers)
    shown = subprocess.run(gapaware_command("status", "--server", server.address), capture_output=True, text=True,
                           timeout=TIMEOUT)
    assert "waiting for the first worker to send the model" in shown.stdout, shown.stdout + shown.stderr
    with WorkerClient(server.address) as chosen, WorkerClient(server.address) as other:
        assert chosen.status().awaiting_model
        reply = chosen._stub.Join(pb.JoinRequest(layout=layout.to_proto(), hostname="a"))
        assert reply.send_initial and reply.worker_id == 0
        with pytest.raises(grpc.RpcError) as waiting:
            other.join(layout)
        assert waiting.value.code() == grpc.StatusCode.UNAVAILABLE  # workers retry it until the model came
        for bad, code in [(initial_push(reply, theta, buffers, secret=b"x" * 32), grpc.StatusCode.PERMISSION_DENIED),
                          (initial_push(reply, torch.full_like(theta, math.nan), buffers),
                           grpc.StatusCode.INVALID_ARGUMENT),
                          (initial_push(reply, theta, buffers[:-1]), grpc.StatusCode.INVALID_ARGUMENT)]:
            with pytest.raises(grpc.RpcError) as refused:
                push_initial(other, bad)
            assert refused.value.code() == code
        assert chosen.status().awaiting_model
        push_initial(chosen, initial_push(reply, theta, buffers))
        assert not chosen.status().awaiting_model
        with pytest.raises(grpc.RpcError) as mismatch:
            other.join(ParamLayout(("w",), ((3,),)))
        assert mismatch.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        other.join(layout)
        version, pulled = other.pull()
        assert version == 0 and torch.equal(pulled, theta)
        assert torch.equal(other.buffers["1.running_var"], model[1].running_var)


def test_a_user_evaluation_that_raises_is_reported_and_training_goes_on(servers):
    import gapaware

    server = servers("--init", "from-worker", "--max-updates", "6", "--lr", "0.1")
    task = bn_task.task()
    optimizer = gapaware.RemoteOptimizer(task.model, server=server.address, evaluate=lambda model: {"x": 1 / 0},
                                         every=2)
    inputs, targets = next(iter(torch.utils.data.DataLoader(task.train, batch_size=32)))
    while not optimizer.finished:
        optimizer.zero_grad()
        task.loss(task.model(inputs), targets).backward()
        optimizer.step()
    optimizer.close()
    assert optimizer.steps == 6
    assert server.wait(timeout=TIMEOUT) == 0, server.log()
    errors = [r for r in server.records("eval") if r.get("reported")]
    assert len(errors) == 3 and all(r["eval_error"].startswith("ZeroDivisionError") for r in errors)
    assert server.records("final")[0]["eval_errors"] == 3


@pytest.mark.parametrize("flags, message", [
    (["--init", "from-worker", "--epochs", "1"], "--max-updates"),
    (["--init", "from-worker", "--task", "digits-mlp"], "exclude each other"),
    (["--init", "from-worker", "--shard", "0/2"], "sharded"),
])
def test_from_worker_settings_it_cannot_serve_are_usage_errors(flags, message):
    done = subprocess.run(gapaware_command("server", "--port", "0", *flags), capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_a_worker_without_a_task_is_told_to_give_one(servers):
    server = servers("--init", "from-worker", "--max-updates", "10")
    done = subprocess.run(gapaware_command("worker", "--server", server.address), capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert done.returncode == 4 and "give --task" in done.stderr, done.stderr


def test_a_model_the_run_cannot_train_is_refused_and_the_next_worker_may_send_another(servers):
    server = servers("--init", "from-worker", "--max-updates", "10", "--no-weight-decay", "head.*")
    model = bn_task.task().model  # no parameter named head.*: the pattern fits none of it
    layout = ParamLayout.from_module(model)
    theta, buffers = flat_parameters(model), model_buffers(model, layout.buffers)
    with WorkerClient(server.address) as first, WorkerClient(server.address) as second:
        reply = first._stub.Join(pb.JoinRequest(layout=layout.to_proto(), hostname="a"))
        with pytest.raises(grpc.RpcError) as refused:
            push_initial(first, initial_push(reply, theta, buffers))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "cannot train this model" in refused.value.details() and "head.*" in refused.value.details()
        assert second._stub.Join(pb.JoinRequest(layout=layout.to_proto(), hostname="b")).send_initial
