"""Benchmark 3, end to end: round trips a second (summed over workers) of 1, 4 and 16 workers
pushing a gradient and pulling the parameters, for gapaware and for the PyTorch-RPC parameter
server of :mod:`bench.rpc_ps`, with TensorPipe forced onto TCP and with its defaults; and for the
gRPC floor (:mod:`bench.grpc_floor`: gapaware's calls with nothing done to the bytes).

    python -m bench.end_to_end
    BENCH_MIB=1,25 BENCH_WORKERS=4 python -m bench.end_to_end    # a subset: model MiB, worker counts

Every system runs the same update (SGD with momentum 0.9 on one flat float32 vector, under one
lock, torch on one thread), each worker is its own process doing nothing but the round trip,
and runs alternate (the system order rotates every repeat) so that drift in the machine's load
hits all of them. Targets (issue 7), against RPC over TCP: float32 ≥ 1.2× at 1 MiB and ≥ 0.8×
at 25 and 100 MiB; bfloat16 transport ≥ 1.3× at 25 and 100 MiB.

A second table gives the CPU time per round trip of the server process and of the workers'
processes in the same runs, every thread counted. On this benchmark's two shared cores their sum
sets the rate once the workers outnumber the cores; between machines, the server's share alone
would.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import multiprocessing
import os
import queue
import socket
import time
from collections.abc import Callable

import torch

from bench import rpc_ps
from bench.grpc_floor import FloorClient, FloorServer
from bench.harness import gapaware_server, machine_line, median, print_table, quick_or, size_label
from bench.models import MIB
from gapaware import WorkerClient

SIZES = [int(mib) * MIB for mib in os.environ["BENCH_MIB"].split(",")] if os.environ.get("BENCH_MIB") \
    else quick_or([64 * 1024], [MIB, 25 * MIB, 100 * MIB])
WORKERS = [int(n) for n in os.environ["BENCH_WORKERS"].split(",")] if os.environ.get("BENCH_WORKERS") \
    else quick_or([2], [1, 4, 16])
SECONDS = quick_or(1.0, 3.0)
REPEATS = quick_or(1, 2)
WARMUP_ROUND_TRIPS = 2
SYSTEMS = ("gapaware", "gapaware-bf16", "grpc-floor", "rpc-tcp", "rpc-default")
RUN_TIMEOUT = 300.0
# Fork: a worker starts in milliseconds instead of seconds of imports. Safe here because this
# process touches neither gRPC nor torch's thread pools before it forks.
CTX = multiprocessing.get_context("fork")


@dataclasses.dataclass(frozen=True)
class Rate:
    """One worker's measurement: round trips a second, round trips, and its CPU seconds over them."""

    per_second: float
    round_trips: int
    cpu_seconds: float


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of a system: round trips a second summed over workers, and CPU milliseconds per round
    trip of the server process and of the workers (summed over them)."""

    per_second: float
    server_cpu_ms: float
    worker_cpu_ms: float


FAILED = Run(math.nan, math.nan, math.nan)


def median_run(runs: list[Run]) -> Run:
    """The median of each of the runs' figures."""
    return Run(*(median([getattr(r, field.name) for r in runs]) for field in dataclasses.fields(Run)))


def _measure(step: Callable[[], None], barrier, seconds: float, results) -> None:
    """Warm up, wait for every worker, then count round trips for ``seconds``; report the rate, the
    count and this process's CPU seconds over them (every thread: gRPC's as well as Python's)."""
    for _ in range(WARMUP_ROUND_TRIPS):
        step()
    barrier.wait(timeout=RUN_TIMEOUT)
    start, cpu = time.perf_counter(), time.process_time()
    count = 0
    while time.perf_counter() - start < seconds:
        step()
        count += 1
    results.put(Rate(count / (time.perf_counter() - start), count, time.process_time() - cpu))


def _gapaware_worker(address: str, transport_dtype: str, barrier, seconds: float, results) -> None:
    torch.set_num_threads(1)
    with WorkerClient(address, transport_dtype=transport_dtype) as client:
        client.join()
        version, theta = client.pull()
        grad = torch.full_like(theta, 1e-6)

        def step() -> None:
            nonlocal version
            _, version, _ = client.push_pull(grad, version, out=theta)  # one receive tensor, as the worker loop

        _measure(step, barrier, seconds, results)
        client.leave()


def _floor_worker(address: str, nbytes: int, barrier, seconds: float, results) -> None:
    with FloorClient(address, nbytes) as client:
        _measure(client.push_pull, barrier, seconds, results)


def _rpc_process(rank: int, world_size: int, port: int, transport: str, numel: int, barrier, seconds: float,
                 results) -> None:
    torch.set_num_threads(1)
    rpc_ps.init(rank, world_size, port, transport)
    if rank > 0:
        server = rpc_ps.rpc.remote(rpc_ps.PS_NAME, rpc_ps.get_parameter_server, args=(numel,))
        grad = torch.full((numel,), 1e-6)
        _measure(lambda: rpc_ps.remote_method(rpc_ps.ParameterServer.push_pull, server, grad),
                 barrier, seconds, results)
    try:
        rpc_ps.rpc.shutdown()
    except RuntimeError as error:  # the rate is reported already; a torn-down store can fail the last barrier
        print(f"rpc rank {rank}: shutdown failed after the measurement: {type(error).__name__}", flush=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _process_cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of process ``pid`` so far, all its threads."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _run_processes(processes: list, started, results, expected: int, server_pids: Callable[[], list[int]]) -> Run:
    """Starts ``processes`` and measures the ``expected`` workers among them, and the servers whose
    pids ``server_pids`` gives once they started: their CPU time, summed, from the moment the workers
    pass their barrier (the event ``started``) to the last worker's report. Raises when one fails or
    the run overruns."""
    deadline = time.monotonic() + RUN_TIMEOUT
    rates: list[Rate] = []

    def wait(ready: Callable[[float], bool]) -> None:
        """Calls ``ready(1.0)``, which blocks for up to a second, until it returns True; raises when a
        process failed or the run overran meanwhile."""
        while not ready(1.0):
            if time.monotonic() > deadline or any(p.exitcode not in (None, 0) for p in processes):
                raise RuntimeError(f"run failed: exit codes {[p.exitcode for p in processes]}")

    def collected(timeout: float) -> bool:
        with contextlib.suppress(queue.Empty):
            rates.append(results.get(timeout=timeout))
        return len(rates) == expected

    try:
        for process in processes:
            process.start()
        wait(started.wait)
        pids = server_pids()
        server_cpu = sum(map(_process_cpu_seconds, pids))
        wait(collected)
        server_cpu = sum(map(_process_cpu_seconds, pids)) - server_cpu
        for process in processes:
            process.join(timeout=60)
        round_trips = sum(rate.round_trips for rate in rates)
        return Run(sum(rate.per_second for rate in rates), 1e3 * server_cpu / round_trips,
                   1e3 * sum(rate.cpu_seconds for rate in rates) / round_trips)
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join()


def run(system: str, nbytes: int, workers: int, seconds: float = SECONDS, *,
        server_prefix: tuple[str, ...] = ()) -> Run:
    """One run of ``system`` on a model of ``nbytes`` with ``workers``; a gapaware server runs under the
    command ``server_prefix`` when given."""
    started, results = CTX.Event(), CTX.Queue()
    barrier = CTX.Barrier(workers, action=started.set)
    if system.startswith("gapaware"):
        dtype = "bfloat16" if system.endswith("bf16") else "float32"
        with gapaware_server(nbytes, "--policy", "asgd", "--momentum", "0.9", "--threads", "1",
                             prefix=server_prefix) as server:
            processes = [CTX.Process(target=_gapaware_worker, args=(server.address, dtype, barrier, seconds, results))
                         for _ in range(workers)]
            return _run_processes(processes, started, results, workers, lambda: [server.proc.pid])
    if system == "grpc-floor":
        with FloorServer(nbytes) as server:
            processes = [CTX.Process(target=_floor_worker, args=(server.address, nbytes, barrier, seconds, results))
                         for _ in range(workers)]
            return _run_processes(processes, started, results, workers, lambda: [server.pid])
    transport = system.removeprefix("rpc-")
    port = _free_port()
    processes = [CTX.Process(target=_rpc_process, args=(rank, workers + 1, port, transport, nbytes // 4, barrier,
                                                         seconds, results))
                 for rank in range(workers + 1)]
    return _run_processes(processes, started, results, workers, lambda: [processes[0].pid])


def main() -> None:
    print(f"end-to-end benchmark: {machine_line()}")
    runs: dict[tuple[str, int, int], list[Run]] = {}
    for repeat in range(REPEATS):
        order = SYSTEMS[repeat % len(SYSTEMS):] + SYSTEMS[:repeat % len(SYSTEMS)]
        for nbytes, workers in itertools.product(SIZES, WORKERS):
            for system in order:
                try:
                    outcome = run(system, nbytes, workers)
                except RuntimeError as error:
                    print(f"  {system} {size_label(nbytes)} × {workers}: {error}")
                    outcome = FAILED
                runs.setdefault((system, nbytes, workers), []).append(outcome)
    rows, cpu_rows = [], []
    for nbytes, workers in itertools.product(SIZES, WORKERS):
        medians = {system: median_run(runs[system, nbytes, workers]) for system in SYSTEMS}
        m = {system: medians[system].per_second for system in SYSTEMS}
        rows.append([size_label(nbytes), workers, *(m[s] for s in SYSTEMS), m["gapaware"] / m["rpc-tcp"],
                     m["gapaware-bf16"] / m["rpc-tcp"], m["gapaware"] / m["rpc-default"],
                     m["gapaware"] / m["grpc-floor"], m["grpc-floor"] / m["rpc-tcp"]])
        cpu_rows.append([size_label(nbytes), workers, *(
            cpu for system in SYSTEMS for cpu in (medians[system].server_cpu_ms, medians[system].worker_cpu_ms))])
    print_table(f"round trips/s summed over workers, median of {REPEATS} alternating runs of {SECONDS:g} s; "
                "targets vs RPC over TCP: f32 ≥ 1.2 at 1 MiB, ≥ 0.8 at 25/100 MiB; bf16 ≥ 1.3 at 25/100 MiB",
                ["model", "workers", *SYSTEMS, "f32 ÷ rpc-tcp", "bf16 ÷ rpc-tcp", "f32 ÷ rpc-default", "f32 ÷ floor",
                 "floor ÷ rpc-tcp"], rows)
    print_table("CPU milliseconds per round trip, in the same runs (medians): the server process, and the workers' "
                "processes summed; every thread counts",
                ["model", "workers", *(f"{system} {part}" for system in SYSTEMS for part in ("server", "workers"))],
                cpu_rows)


if __name__ == "__main__":
    main()
