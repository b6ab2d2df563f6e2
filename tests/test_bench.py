"""The benchmarks run (``BENCH_QUICK=1``: tiny sizes) and print finite figures. No timing is checked."""
import csv
import math
import os
import re
import subprocess
import sys

import grpc
import pytest
import torch

from bench.free_work import FREE_SERVER, free_arithmetic
from bench.harness import gapaware_server
from bench.network import cannot_make_namespaces
from gapaware import WorkerClient

SLOWEST = ("memory", "free_work", "end_to_end", "overlap")
"""Smoke tests of 15 to 30 s each on 2 cores, left to ``make test-slow`` to keep ``make test`` under 6
minutes: free_work runs the systems of end_to_end again, memory starts 64 workers."""
BENCHMARKS = [pytest.param(name, marks=pytest.mark.slow) if name in SLOWEST else name
              for name in ["transport", "server_update", "end_to_end", "scale", "memory", "overlap", "free_work",
                           "push_norms", "time_to_accuracy"]]


def table_rows(output: str) -> list[list[str]]:
    """The rows under the dashed line of the table the benchmark printed."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if re.fullmatch(r"\s*[- ]+", line) and "-" in line)
    return [line.split() for line in lines[start + 1:] if line.strip() and not line.startswith("  error")]


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_runs_and_prints_finite_figures(name, tmp_path):
    done = subprocess.run([sys.executable, "-m", f"bench.{name}"],
                          env={**os.environ, "BENCH_QUICK": "1", "BENCH_TTA_OUT": str(tmp_path)},
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = table_rows(done.stdout)
    assert rows, done.stdout
    numbers = [float(cell) for row in rows for cell in row if re.fullmatch(r"-?[\d.]+(e[-+]?\d+)?", cell)]
    assert numbers and all(math.isfinite(x) and x >= 0 for x in numbers), done.stdout
    assert "nan" not in {cell for row in rows for cell in row}, done.stdout
    if name == "scale":
        assert rows[0][-1] == "0", f"the load generator saw errors:\n{done.stdout}"
    if name == "time_to_accuracy":
        _check_time_to_accuracy_outputs(tmp_path, done.stdout)


def _check_time_to_accuracy_outputs(out, stdout: str) -> None:
    """Both systems trained (steps taken, accuracy above the untrained model's) and every output was written."""
    with (out / "results.csv").open() as file:
        results = list(csv.DictReader(file))
    assert {r["system"] for r in results} == {"gap-aware", "ddp-lr0.05"}, stdout
    assert all(int(r["steps"]) > 0 and r["ended"] == "budget" for r in results), stdout
    with (out / "curves.csv").open() as file:
        curves = list(csv.DictReader(file))
    for system in ("gap-aware", "ddp-lr0.05"):
        accuracy = [float(r["accuracy"]) for r in curves if r["system"] == system]
        assert len(accuracy) >= 2 and max(accuracy) > accuracy[0] + 0.1, (system, accuracy)
    assert (out / "digits-cnn-n2.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
@pytest.mark.skipif(cannot_make_namespaces() is not None, reason="bench.links needs root and `ip netns`")
def test_links_benchmark_runs_in_namespaces_it_removes():
    """bench.links in quick mode: the server in one namespace, the workers in another, every system's figures
    finite and the namespaces gone afterwards."""
    before = _bench_namespaces()
    done = subprocess.run([sys.executable, "-m", "bench.links"], env={**os.environ, "BENCH_QUICK": "1"},
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = table_rows(done.stdout)[:3]  # the first table: one row a system
    assert [row[4] for row in rows] == ["float32", "int8", "rpc-tcp"], done.stdout
    numbers = [float(cell) for row in rows for cell in row[5:] if cell != "-"]
    assert len(numbers) == 17 and all(math.isfinite(x) and x > 0 for x in numbers), done.stdout
    left = _bench_namespaces() - before
    assert not left, f"namespaces left behind: {sorted(left)}"


def _bench_namespaces() -> set[str]:
    """The namespaces named as bench.network names them (another run's may exist before this one)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout.split()
    return {name for name in listed if name.startswith(("ga-srv-", "ga-wrk-"))}


def _push_nan(prefix: tuple[str, ...] = ()):
    """Pushes an all-NaN gradient to a fresh server run under ``prefix``; returns the push's result,
    the version before, the version and parameters after, and the parameters before."""
    with gapaware_server(64 * 1024, "--policy", "asgd", prefix=prefix) as server, \
            WorkerClient(server.address) as client:
        client.join()
        version, theta = client.pull()
        result, new_version, after = client.push_pull(torch.full_like(theta, math.nan), version)
        return result, version, new_version, after, theta


def test_free_work_bound_runs_gapaware_without_its_arithmetic():
    """bench.free_work measures what it says: its server and client skip the finiteness check and the
    update (θ stays as it was, the NaN gradient counts as applied) and agree on checksums of 0, while
    the same push to a plain server is refused."""
    with pytest.raises(grpc.RpcError) as refused:
        _push_nan()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with free_arithmetic():
        result, version, new_version, after, theta = _push_nan(prefix=FREE_SERVER)
    assert result.applied and new_version == version + 1
    assert torch.equal(after, theta)


@pytest.mark.slow
def test_shards_benchmark_runs_and_prints_finite_figures(tmp_path):
    """bench.shards starts S servers a run, too slow for the quick list above."""
    test_benchmark_runs_and_prints_finite_figures("shards", tmp_path)
