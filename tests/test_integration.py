"""A real server and real worker processes over loopback gRPC."""
import math
import time

import grpc
import pytest
import torch

from gapaware import WorkerClient
from gapaware.common.layout import ParamLayout
from gapaware.common.tasks import load_task
from gapaware.processes import start_worker


def test_three_workers_train_digits_mlp_to_real_accuracy(servers, tmp_path):
    server = servers("--task", "digits-mlp", "--policy", "gap-aware", "--lr", "0.05", "--max-updates", "900",
                     "--eval-every", "300")
    # Worker 0 loads its batches in the training thread, the others a prefetch thread ahead.
    workers = [start_worker(server.address, tmp_path, i, *(("--prefetch-batches", "0") if i == 0 else ()))
               for i in range(3)]

    seen_live = set()
    with WorkerClient(server.address, timeout=10) as client:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and server.proc.poll() is None:
            try:
                status = client.status()
            except grpc.RpcError:
                break
            seen_live.update(w.worker_id for w in status.workers if w.pushes > 0)
            if status.finished:
                break
            time.sleep(0.2)
    assert server.wait(timeout=120) == 0, server.log()
    assert [w.wait(timeout=60) for w in workers] == [0, 0, 0]

    assert seen_live == {1, 2, 3}, "Status should list every worker while it trains"
    final = server.records("final")[-1]
    assert final["version"] == 900
    assert final["pushes"] == 900
    assert final["accuracy"] >= 0.9
    assert final["run_mean_staleness"] > 0.5, "three concurrent workers produce stale pushes"
    assert final["run_mean_gap"] >= 1.0
    evals = server.records("eval")
    versions = [r["version"] for r in evals]
    assert len(versions) >= 2 and versions == sorted(versions) and 300 <= versions[0] < 600, versions


def test_worker_with_wrong_model_is_refused_at_join(servers):
    server = servers("--task", "digits-mlp", "--max-updates", "10")
    cnn = load_task("digits-cnn").model
    with WorkerClient(server.address, timeout=10) as client:
        with pytest.raises(grpc.RpcError) as refused:
            client.join(ParamLayout.from_module(cnn))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "does not match the server's" in refused.value.details()
        assert client.status().workers == []


def test_client_api_pull_push_reports_version_staleness_and_gap(servers):
    server = servers("--task", "digits-mlp", "--max-updates", "50", "--policy", "gap-aware")
    mlp = load_task("digits-mlp")
    with WorkerClient(server.address, timeout=10) as first, WorkerClient(server.address, timeout=10) as second:
        info = first.join(ParamLayout.from_module(mlp.model))
        second.join()
        assert info.config.task == "digits-mlp"
        v1, theta1 = first.pull()
        v2, theta2 = second.pull()
        assert v1 == v2 == 0 and torch.equal(theta1, theta2)
        fresh = first.push(torch.full_like(theta1, 0.1), base_version=v1)
        assert (fresh.version, fresh.staleness, fresh.applied) == (1, 0, True)
        assert fresh.mean_gap == pytest.approx(1.0)
        stale = second.push(torch.full_like(theta2, 0.1), base_version=v2)
        assert (stale.version, stale.staleness) == (2, 1)
        assert stale.mean_gap > 1.0 and math.isfinite(stale.mean_gap)
        version, theta = first.pull()
        assert version == 2 and not torch.equal(theta, theta1)
        result, version, after = first.push_pull(torch.zeros_like(theta), base_version=version)
        assert (result.version, result.staleness, version) == (3, 0, 3)
        assert after.shape == theta.shape
        with pytest.raises(grpc.RpcError) as refused:
            second.push(torch.zeros_like(theta2), base_version=v2)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        first.leave()
        second.leave()
        assert first.status().workers == []
