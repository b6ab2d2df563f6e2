"""Model buffers (BatchNorm's statistics) travel with pushes and pulls, and the server evaluates,
checkpoints and exports with them."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from gapaware.common.buffers import buffer_specs, checksum, model_buffers, unpack_buffers
from gapaware.common.config import RunConfig
from gapaware.common.evaluation import evaluate
from gapaware.common.layout import ParamLayout
from gapaware.common.tasks import load_task
from gapaware.common.transport import TransportError
from gapaware.export import export_model
from gapaware.processes import ServerProcess, start_worker
from gapaware.server.checkpoint import read_checkpoint, write_checkpoint
from gapaware.server.push import admit
from gapaware.server.state import ParameterServerState

BN_TASK = "tests.bn_task:task"


def test_buffers_round_trip_in_their_own_dtypes():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model(torch.randn(8, 3) + 2)
    specs = buffer_specs(model)
    assert [(s.name, s.dtype) for s in specs] == [
        ("1.running_mean", "float32"), ("1.running_var", "float32"), ("1.num_batches_tracked", "int64")]
    data = model_buffers(model, specs)
    tensors = unpack_buffers(data, checksum(data), specs)
    assert tensors["1.num_batches_tracked"].dtype == torch.int64 and tensors["1.num_batches_tracked"].item() == 1
    assert torch.equal(tensors["1.running_mean"], model[1].running_mean)
    with pytest.raises(TransportError, match="CRC-32C"):
        unpack_buffers(data, checksum(data) ^ 1, specs)
    with pytest.raises(TransportError, match="hold"):
        unpack_buffers(data[:-1], checksum(data[:-1]), specs)


def test_the_layout_and_its_fingerprint_cover_the_buffers():
    with_bn = ParamLayout.from_module(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=True)))
    without = ParamLayout.from_module(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False)))
    assert with_bn.names == without.names and with_bn.fingerprint != without.fingerprint
    assert ParamLayout.from_proto(with_bn.to_proto()) == with_bn
    assert "num_batches_tracked" in with_bn.describe_mismatch(without)


def test_server_accuracy_is_the_exported_models_with_its_buffers(tmp_path):
    """A real server and worker train a BatchNorm model; the accuracy the server reports is the one the
    exported model scores when evaluated on its own, and without the running statistics it scores
    visibly less."""
    checkpoints = tmp_path / "checkpoints"
    server = ServerProcess(tmp_path, "--task", BN_TASK, "--max-updates", "200", "--eval-every", "100",
                           "--batch-size", "32", "--lr", "0.05", "--checkpoint-dir", str(checkpoints))
    worker = start_worker(server.address, tmp_path, 0, "--threads", "1")
    try:
        assert server.wait(timeout=180) == 0, server.log()
        assert worker.wait(timeout=60) == 0, (tmp_path / "worker-0.log").read_text()
    finally:
        for proc in (worker, server.proc):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    final = server.records("final")[-1]
    assert final["version"] == 200
    out = tmp_path / "model.safetensors"
    export_model([tmp_path], out)
    task = load_task(BN_TASK)
    state = load_file(str(out))
    assert set(state) == set(task.model.state_dict())
    assert state["1.num_batches_tracked"].dtype == torch.int64 and state["1.num_batches_tracked"].item() == 200
    task.model.load_state_dict(state)
    _, accuracy = evaluate(task.model, task.loss, task.test)
    assert abs(accuracy - final["accuracy"]) <= 1 / len(task.test), (accuracy, final)
    assert accuracy >= 0.9, final
    task.model[1].reset_running_stats()
    _, without_statistics = evaluate(task.model, task.loss, task.test)
    assert without_statistics < accuracy - 0.1, (without_statistics, accuracy)


def test_checkpoints_save_and_restore_the_buffers(tmp_path):
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    layout = ParamLayout.from_module(model)
    config = RunConfig(max_updates=10)
    state = ParameterServerState(config, layout, torch.zeros(layout.numel), train_size=100,
                                 buffers=model_buffers(model, layout.buffers))
    worker = state.join("test", "cpu", layout).worker_id
    model(torch.randn(8, 3) + 5)
    pushed = model_buffers(model, layout.buffers)
    version, _ = state.pull(worker)
    state.push(admit(worker, torch.zeros(layout.numel), numel=layout.numel, base_version=version,
                     buffers=pushed, buffers_crc32c=checksum(pushed)))
    assert state.buffers() == (pushed, checksum(pushed)), "the latest applied push's buffers are kept"
    restored = ParameterServerState(config, layout, torch.zeros(layout.numel), train_size=100,
                                    buffers=model_buffers(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)),
                                                          layout.buffers))
    restored.restore(read_checkpoint(write_checkpoint(tmp_path, state.checkpoint())), incarnation=1)
    buffers = restored.buffer_tensors()
    assert buffers["1.num_batches_tracked"].dtype == torch.int64 and buffers["1.num_batches_tracked"].item() == 1
    assert torch.equal(buffers["1.running_mean"], model[1].running_mean)
