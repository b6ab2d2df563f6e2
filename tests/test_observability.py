"""A live server seen from outside: Prometheus metrics, health, reflection, TensorBoard, status."""
import json
import math
import signal
import socket
import urllib.request

import grpc
import pytest
import torch
from click.testing import CliRunner
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families

from gapaware import WorkerClient
from gapaware.cli import main
from gapaware.worker.health import check_health
from tests.waiting import wait_for


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample of ``/metrics`` as {(name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def tensorboard_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_metrics_scraped_from_a_live_run_move_with_every_push(servers, tmp_path):
    metrics_port = free_port()
    # Configured through GAPAWARE_* variables only, as the deploy recipes do.
    server = servers(env={"GAPAWARE_TASK": "digits-mlp", "GAPAWARE_MAX_UPDATES": "1000", "GAPAWARE_EVAL_EVERY": "4",
                          "GAPAWARE_METRICS_PORT": str(metrics_port),
                          "GAPAWARE_TENSORBOARD": str(tmp_path / "tb")})
    before = scrape(metrics_port)
    assert before[("gapaware_updates", ())] == 0
    assert before[("gapaware_run_info", (("policy", "gap-aware"), ("task", "digits-mlp")))] == 1
    assert math.isnan(before[("gapaware_eval_accuracy", ())])

    with WorkerClient(server.address, timeout=10) as first, WorkerClient(server.address, timeout=10) as second:
        first.join()
        second.join()
        numel = first.info.layout.numel
        v1, theta1 = first.pull()
        v2, _ = second.pull()
        first.push(torch.full_like(theta1, 0.01), base_version=v1)          # staleness 0
        second.push(torch.full_like(theta1, 0.01), base_version=v2)         # staleness 1
        with pytest.raises(grpc.RpcError):
            second.push(torch.zeros_like(theta1), base_version=v2)          # refused: nothing pulled since
        version, _ = first.pull()
        for _ in range(4):                                                   # four fresh updates via push-and-pull
            _, version, _ = first.push_pull(torch.zeros_like(theta1), base_version=version)
        wait_for(lambda: server.records("eval"), 30, "an evaluation", interval=0.1)
        during = scrape(metrics_port)

        table = CliRunner().invoke(main, ["status", "--server", server.address])
        as_json = CliRunner().invoke(main, ["status", "--server", server.address, "--json"])
        first.leave()
        second.leave()
    after = scrape(metrics_port)

    assert during[("gapaware_updates", ())] == 6
    assert during[("gapaware_pushes_accepted_total", ())] == 6
    assert during[("gapaware_pushes_rejected_total", (("reason", "stale_snapshot"),))] == 1
    assert during[("gapaware_push_staleness_count", ())] == 6
    assert during[("gapaware_push_staleness_sum", ())] == 1
    assert during[("gapaware_push_staleness_bucket", (("le", "0.0"),))] == 5
    assert during[("gapaware_push_gap_count", ())] == 6
    assert during[("gapaware_push_gap_sum", ())] > 6, "the stale push has a Gap above 1"
    assert during[("gapaware_update_latency_seconds_count", ())] == 6
    assert during[("gapaware_received_bytes_total", ())] == 6 * numel * 4, \
        "6 float32 gradients arrived; the stale push was refused from its header, before its tensor"
    assert during[("gapaware_sent_bytes_total", ())] == 7 * numel * 4, "3 pulls and 4 push-pulls went out"
    assert during[("gapaware_live_workers", ())] == 2
    assert 0.0 < during[("gapaware_eval_accuracy", ())] <= 1.0
    assert during[("gapaware_eval_version", ())] >= 4
    assert after[("gapaware_live_workers", ())] == 0

    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert "task digits-mlp, policy gap-aware, running" in lines[0]
    assert "update 6 of 1000" in lines[1] and "2 live workers" in table.output
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["worker"])
    rows = [line.split() for line in lines[header + 1:]]
    assert sorted((int(r[0]), int(r[4])) for r in rows) == [(1, 5), (2, 1)], "worker id and its pushes"
    assert as_json.exit_code == 0, (as_json.output, as_json.exception)
    status = json.loads(as_json.output)
    assert status["version"] == 6 and status["run_config"]["task"] == "digits-mlp"
    assert sorted(w["pushes"] for w in status["workers"]) == [1, 5]

    server.proc.send_signal(signal.SIGTERM)
    assert server.wait(timeout=60) == 0, server.log()
    records = server.records()
    assert sum(sum(r["staleness_counts"]) for r in records) == 6
    assert [sum(r["staleness_counts"][1:2]) for r in records if r["staleness_counts"]][0] == 1
    scalars = tensorboard_scalars(tmp_path / "tb")
    assert [step for step, _ in scalars["eval/accuracy"]] == [r["version"] for r in records]
    assert scalars["eval/accuracy"][-1][1] == pytest.approx(records[-1]["accuracy"])
    plotted = CliRunner().invoke(main, ["plot", str(server.metrics_file)])
    assert plotted.exit_code == 0, plotted.output
    assert server.metrics_file.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_health_is_serving_then_not_serving_while_the_server_shuts_down(servers):
    server = servers("--task", "digits-mlp", "--max-updates", "100")
    database = ProtoReflectionDescriptorDatabase(grpc.insecure_channel(server.address))
    assert {"gapaware.v2.ParameterServer", "grpc.health.v1.Health"} <= set(database.get_services())
    assert check_health(server.address) == "SERVING"
    assert CliRunner().invoke(main, ["health", "--server", server.address]).exit_code == 0

    with WorkerClient(server.address, timeout=10) as client:
        client.join()                          # a live worker keeps the server lingering after SIGTERM
        server.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: check_health(server.address) != "SERVING", 4, "the health service to stop serving")
        assert check_health(server.address) == "NOT_SERVING"
        assert server.proc.poll() is None, "still running: it waits for the worker to leave"
        refused = CliRunner().invoke(main, ["health", "--server", server.address])
        assert refused.exit_code == 1 and "NOT_SERVING" in refused.output
        client.leave()
    assert server.wait(timeout=60) == 0, server.log()
    assert check_health(server.address, timeout=2) == "UNREACHABLE"


def test_status_and_health_of_an_unreachable_server_fail_with_a_message():
    address = f"127.0.0.1:{free_port()}"
    status = CliRunner().invoke(main, ["status", "--server", address])
    assert status.exit_code == 5 and f"no status from {address}: UNAVAILABLE" in status.output
    health = CliRunner().invoke(main, ["health", "--server", address, "--wait", "1"])
    assert health.exit_code == 1 and "UNREACHABLE" in health.output


def test_tensorboard_flag_without_the_package_is_a_usage_error(monkeypatch, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "torch.utils.tensorboard", None)
    result = CliRunner().invoke(main, ["server", "--tensorboard", str(tmp_path / "tb")])
    assert result.exit_code == 2
    assert "pip install 'gapaware[tensorboard]'" in result.output
    assert not (tmp_path / "tb").exists()


def test_metrics_port_in_use_is_a_clear_error(servers):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match=rf"could not serve metrics on 127.0.0.1:{port} \(--metrics-port\)"):
            servers("--task", "digits-mlp", "--metrics-port", str(port))
