"""Benchmark 9, links: round trips over emulated cloud links, float32 to 8-bit, against PyTorch RPC.

    sudo python -m bench.links                       # needs root and `ip netns`; says so and skips otherwise
    BENCH_QUICK=1 python -m bench.links              # smoke test: one link, 64 KiB, 1 worker, 3 systems, 1 s
    BENCH_LINKS=1gbit BENCH_MIB=100 BENCH_WORKERS=4 BENCH_SYSTEMS=float32,int8 python -m bench.links  # a subset

The server runs in one network namespace and the workers in another, joined by a veth pair that
a token bucket paces at the link's rate in each direction (:mod:`bench.network`): (a) 1 Gbit/s
with a 1 ms round trip, (b) 100 Mbit/s with 30 ms. This kernel has no ``netem``: a relay in the
server's namespace adds the latency (:mod:`bench.delay`), on link (b) only. A userspace relay's
wake-ups on a busy machine come later than 1 ms (several ms at the median), so link (a) goes
without: the veth's own round trip is about 0.02 ms. The "call ms" column shows what each run saw.
Each worker is a process pushing a gradient and pulling the parameters, one round trip a step,
of a flat 25 or 100 MiB model; 1 and 4 workers. gapaware's
systems send both directions in one dtype (``--push-dtype`` and ``--pull-dtype``): float32,
bfloat16, int8, float8 (8-bit pushes with error feedback, delta pulls); ``grpc-floor`` is
gapaware's calls of float32 size doing nothing with the bytes (:mod:`bench.grpc_floor`);
``rpc-tcp`` is the PyTorch RPC parameter server of :mod:`bench.rpc_ps` over TensorPipe's TCP
transport, on the same link but never through the relay (it opens connections to addresses it
advertises itself): on link (b) it gets the rate, not the latency. Every system applies the same
update (ASGD with momentum 0.9); systems alternate.

Reported: round trips a second (summed over workers), the bytes that crossed the worker's end of
the link per round trip (headers, acknowledgements and every full pull included), and the ratio
to the link's bound: the link rate ÷ the tensor bytes a round trip must move (push and pull; with
several workers pushes and pulls share the two directions, so up to 2 is possible).
"""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import multiprocessing
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.grpc_floor import FloorServer
from bench.harness import gapaware_server, machine_line, print_table, quick_or, size_label
from bench.models import MIB
from bench.network import Link, Shape, cannot_make_namespaces, veth_link
from gapaware.processes import spawn_ready

LINKS = {"1gbit": Shape("1gbit", 1.0), "100mbit": Shape("100mbit", 30.0)}
RELAYED_FROM_MS = 10.0
"""Links with a round trip at least this long get it from the relay; shorter ones go without."""
SIZES = [int(mib) * MIB for mib in os.environ["BENCH_MIB"].split(",")] if os.environ.get("BENCH_MIB") \
    else quick_or([64 * 1024], [25 * MIB, 100 * MIB])
WORKERS = [int(n) for n in os.environ["BENCH_WORKERS"].split(",")] if os.environ.get("BENCH_WORKERS") \
    else quick_or([1], [1, 4])
CHOSEN_LINKS = os.environ["BENCH_LINKS"].split(",") if os.environ.get("BENCH_LINKS") else quick_or(["1gbit"],
                                                                                                     list(LINKS))
SYSTEMS = tuple(os.environ["BENCH_SYSTEMS"].split(",")) if os.environ.get("BENCH_SYSTEMS") \
    else quick_or(("float32", "int8", "rpc-tcp"),
                  ("float32", "bfloat16", "int8", "float8", "grpc-floor", "rpc-tcp"))
RATIOS = (("int8", "float32"), ("int8", "rpc-tcp"), ("float8", "float32"), ("bfloat16", "float32"),
          ("float32", "rpc-tcp"), ("float32", "grpc-floor"), ("grpc-floor", "rpc-tcp"))
DTYPES = ("float32", "bfloat16", "int8", "float8")
"""gapaware's systems: both directions in one of these."""
ROUND_TRIPS = 4          # each run lasts about this many of each worker's round trips at the link's bound,
SECONDS = quick_or((1.0, 1.0), (5.0, 30.0))  # within these many seconds
WARMUP_ROUND_TRIPS = 1   # after the join's full pull: 8-bit pulls are deltas by the measurement
BUDGET_SECONDS = float(os.environ.get("BENCH_LINKS_MINUTES", "90")) * 60
RPC_PORT = 20000 + os.getpid() % 10000
CTX = multiprocessing.get_context("fork")  # the driver forks its workers before touching gRPC or torch's pools


@dataclass(frozen=True)
class Run:
    """One run: round trips a second summed over workers, the bytes the worker side sent and received
    per round trip, and the median time of an empty call (gapaware's Status: the link's round trip as
    the runs see it, relay included; NaN for RPC)."""

    per_second: float
    up: float
    down: float
    call_ms: float


FAILED = Run(math.nan, math.nan, math.nan, math.nan)


def must_move(system: str, nbytes: int) -> int:
    """The tensor bytes of one round trip, push and pull: what no system can send less of."""
    from gapaware.common.transport import WIRE_DTYPE_NAMES, wire_bytes
    dtype = system if system in WIRE_DTYPE_NAMES else "float32"
    return 2 * wire_bytes(WIRE_DTYPE_NAMES[dtype], nbytes // 4)


def window(system: str, nbytes: int, workers: int, shape: Shape) -> float:
    """Seconds a run measures: :data:`ROUND_TRIPS` of each worker at the link's bound, within :data:`SECONDS`."""
    low, high = SECONDS
    return min(high, max(low, ROUND_TRIPS * workers * must_move(system, nbytes) / shape.bytes_per_second))


# -- in the workers' namespace: the driver and its workers --------------------------------------

def _measure(step, barrier, seconds: float, results, call_ms: float = math.nan) -> None:
    for _ in range(WARMUP_ROUND_TRIPS):
        step()
    barrier.wait()
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        step()
        count += 1
    results.put((count, time.perf_counter() - start, call_ms))


def _gapaware_worker(spec: dict, barrier, results) -> None:
    import torch
    from gapaware import WorkerClient
    torch.set_num_threads(1)
    with WorkerClient(spec["address"], push_dtype=spec["system"], pull_dtype=spec["system"], timeout=600) as client:
        client.join()
        calls = []
        for _ in range(5):
            began = time.perf_counter()
            client.status()
            calls.append(time.perf_counter() - began)
        theta = torch.empty(spec["nbytes"] // 4)
        version, _ = client.pull(out=theta)
        grad = torch.full_like(theta, 1e-6)

        def step() -> None:
            nonlocal version
            _, version, _ = client.push_pull(grad, version, out=theta)

        _measure(step, barrier, spec["seconds"], results, 1e3 * statistics.median(calls))
        client.leave()


def _floor_worker(spec: dict, barrier, results) -> None:
    from bench.grpc_floor import FloorClient
    with FloorClient(spec["address"], spec["nbytes"]) as client:
        _measure(client.push_pull, barrier, spec["seconds"], results)


def _rpc_trainer(spec: dict, rank: int, barrier, results) -> None:
    import torch
    from bench import rpc_ps
    torch.set_num_threads(1)
    rpc_ps.init(rank, spec["workers"] + 1, spec["port"], "tcp", address=spec["server"])
    server = rpc_ps.rpc.remote(rpc_ps.PS_NAME, rpc_ps.get_parameter_server, args=(spec["nbytes"] // 4,))
    grad = torch.full((spec["nbytes"] // 4,), 1e-6)
    _measure(lambda: rpc_ps.remote_method(rpc_ps.ParameterServer.push_pull, server, grad), barrier, spec["seconds"],
             results)
    rpc_ps.rpc.shutdown()


def _counters(interface: str) -> tuple[int, int]:
    statistics = Path(f"/sys/class/net/{interface}/statistics")
    return int((statistics / "tx_bytes").read_text()), int((statistics / "rx_bytes").read_text())


def drive(spec: dict) -> dict:
    """Runs ``spec["workers"]`` workers of ``spec["system"]``; returns their summed rate and the bytes the
    interface moved per round trip while they measured (from their barrier until the last is done)."""
    started = CTX.Array("q", 2)

    def mark() -> None:
        started[0], started[1] = _counters(spec["interface"])

    barrier, results = CTX.Barrier(spec["workers"], action=mark), CTX.Queue()
    if spec["system"] == "rpc-tcp":
        processes = [CTX.Process(target=_rpc_trainer, args=(spec, rank, barrier, results))
                     for rank in range(1, spec["workers"] + 1)]
    else:
        worker = _floor_worker if spec["system"] == "grpc-floor" else _gapaware_worker
        processes = [CTX.Process(target=worker, args=(spec, barrier, results)) for _ in range(spec["workers"])]
    for process in processes:
        process.start()
    reports = []
    try:
        while len(reports) < len(processes):
            with contextlib.suppress(queue.Empty):
                reports.append(results.get(timeout=1.0))
            failed = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
            if failed and len(reports) < len(processes):
                raise RuntimeError(f"a worker failed (exit codes {[p.exitcode for p in processes]})")
        sent, received = _counters(spec["interface"])
        for process in processes:
            process.join(timeout=60)
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
    round_trips = sum(count for count, _, _ in reports)
    return {"per_second": sum(count / seconds for count, seconds, _ in reports),
            "up": (sent - started[0]) / round_trips, "down": (received - started[1]) / round_trips,
            "call_ms": statistics.median(call_ms for _, _, call_ms in reports)}


def rpc_server(spec: dict) -> None:
    """Rank 0 of the RPC world: the parameter server, until the trainers shut the world down."""
    import torch
    from bench import rpc_ps
    torch.set_num_threads(1)
    rpc_ps.init(0, spec["workers"] + 1, spec["port"], "tcp", address=spec["server"])
    rpc_ps.rpc.shutdown()


# -- in the benchmark's own namespace: the runs --------------------------------------------------

def _in_namespace(link: Link, namespace: str, interface: str, role: str, spec: dict, log: Path, *,
                  timeout: float) -> subprocess.Popen:
    """``python -m bench.links ROLE SPEC`` in ``namespace``, in a session of its own (its forked workers
    are killed with it), with TensorPipe and Gloo bound to ``interface``."""
    env = {**os.environ, "TP_SOCKET_IFNAME": interface, "GLOO_SOCKET_IFNAME": interface,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH")]))}
    with log.open("w") as out:
        return subprocess.Popen([*link.exec_in(namespace), sys.executable, "-m", "bench.links", role,
                                 json.dumps({**spec, "timeout": timeout})], stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _wait(driver: subprocess.Popen, log: Path, timeout: float) -> Run:
    try:
        driver.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"overran its {timeout:.0f} s") from None
    lines = log.read_text().splitlines()
    if driver.returncode != 0 or not lines:
        raise RuntimeError(f"exit {driver.returncode}: {' | '.join(lines[-3:])}")
    return Run(**json.loads(lines[-1]))


def run(link: Link, shape: Shape, system: str, nbytes: int, workers: int, workdir: Path) -> Run:
    seconds = window(system, nbytes, workers, shape)
    timeout = 120.0 + 3 * (seconds + (WARMUP_ROUND_TRIPS + 2) * workers * must_move(system, nbytes)
                           / shape.bytes_per_second)
    spec = {"system": system, "nbytes": nbytes, "workers": workers, "seconds": seconds,
            "interface": link.worker_if, "server": link.server_address, "port": RPC_PORT}
    if system == "rpc-tcp":  # TensorPipe connects to addresses it advertises itself: no relay can stand in
        server = _in_namespace(link, link.server_ns, link.server_if, "rpc-server", spec, workdir / "rpc-server.log",
                               timeout=timeout)
        log = workdir / "rpc-driver.log"
        driver = _in_namespace(link, link.worker_ns, link.worker_if, "drive", spec, log, timeout=timeout)
        try:
            return _wait(driver, log, timeout)
        finally:
            _stop(driver)
            _stop(server)
    if system == "grpc-floor":
        with FloorServer(nbytes, host=link.server_address, prefix=link.exec_in(link.server_ns)) as floor:
            return _drive(link, shape, floor.port, spec, workdir, timeout)
    flags = ("--host", link.server_address, "--insecure", "--policy", "asgd", "--momentum", "0.9", "--threads", "1",
             "--lease-seconds", "0")
    with gapaware_server(nbytes, *flags, prefix=link.exec_in(link.server_ns)) as server:
        return _drive(link, shape, server.port, spec, workdir, timeout)


def _drive(link: Link, shape: Shape, port: int, spec: dict, workdir: Path, timeout: float) -> Run:
    """The driver's run against the gRPC server on ``port``, through a relay that adds the link's latency
    when it is :data:`RELAYED_FROM_MS` or more."""
    relay = None
    if shape.rtt_ms >= RELAYED_FROM_MS:
        relay, ready = spawn_ready([*link.exec_in(link.server_ns), sys.executable, "-m", "bench.delay",
                                    link.server_address, "0", link.server_address, str(port), f"{shape.rtt_ms / 2:g}",
                                    str(workdir / "relay.ready")], workdir / "relay.ready", workdir / "relay.log")
        port = ready["port"]
    try:
        log = workdir / f"{spec['system']}-driver.log"
        driver = _in_namespace(link, link.worker_ns, link.worker_if, "drive",
                               {**spec, "address": f"{link.server_address}:{port}"}, log, timeout=timeout)
        try:
            return _wait(driver, log, timeout)
        finally:
            _stop(driver)
    finally:
        if relay is not None:
            relay.kill()
            relay.wait()


def main() -> None:
    why = cannot_make_namespaces()
    if why is not None:
        print(f"links benchmark skipped: {why} (run it as root, with iproute2 and tc)")
        return
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # the namespaces go on the way out
    print(f"links benchmark: {machine_line()}")
    began = time.monotonic()
    runs: dict[tuple[str, int, int, str], Run] = {}
    cases = list(itertools.product(CHOSEN_LINKS, SIZES, WORKERS))
    for index, (link_name, nbytes, workers) in enumerate(cases):
        shape = LINKS[link_name]
        order = SYSTEMS[index % len(SYSTEMS):] + SYSTEMS[:index % len(SYSTEMS)]
        with veth_link(shape) as link, tempfile.TemporaryDirectory(prefix="gapaware-links-") as workdir:
            for system in order:
                if time.monotonic() - began > BUDGET_SECONDS:
                    print(f"  {link_name} {size_label(nbytes)} × {workers} {system}: skipped, past the budget of "
                          f"{BUDGET_SECONDS / 60:g} min (BENCH_LINKS_MINUTES)")
                    runs[link_name, nbytes, workers, system] = FAILED
                    continue
                try:
                    runs[link_name, nbytes, workers, system] = run(link, shape, system, nbytes, workers, Path(workdir))
                except RuntimeError as error:
                    print(f"  {link_name} {size_label(nbytes)} × {workers} {system}: {error}")
                    runs[link_name, nbytes, workers, system] = FAILED
    rows, ratios = [], []
    for link_name, nbytes, workers in cases:
        shape = LINKS[link_name]
        m = {system: runs[link_name, nbytes, workers, system] for system in SYSTEMS}
        for system in SYSTEMS:
            bound = shape.bytes_per_second / must_move(system, nbytes)
            call = m[system].call_ms if system in DTYPES else "-"
            rows.append([shape.name, size_label(nbytes), workers, system, m[system].per_second, m[system].up / 1e6,
                         m[system].down / 1e6, bound, m[system].per_second / bound, call])
        rate = {system: m[system].per_second for system in SYSTEMS}
        ratios.append([shape.name, size_label(nbytes), workers,
                       *(rate[top] / rate[bottom] if {top, bottom} <= rate.keys() else "-" for top, bottom in RATIOS)])
    print_table(f"round trips/s summed over workers, MB per round trip at the worker's end of the link, and the "
                f"link's bound (rate ÷ tensor bytes of a round trip); {time.monotonic() - began:.0f} s",
                ["link", "model", "workers", "system", "round trips/s", "MB up", "MB down", "bound/s", "÷ bound",
                 "call ms"], rows)
    print_table("ratios of round trips/s in the same runs; targets: float32 ≥ 0.9 of the bound on 1gbit; int8 at "
                "100 MiB on 1gbit ≥ 3 × float32 and ≥ 2.5 × rpc-tcp; on 100mbit int8 ≥ 3.5 × float32",
                ["link", "model", "workers", *(f"{top} ÷ {bottom}" for top, bottom in RATIOS)], ratios)
    print(f"load after: {machine_line()}")


def _role() -> None:
    role, spec = sys.argv[1], json.loads(sys.argv[2])
    signal.alarm(int(spec["timeout"]))  # a run the benchmark lost track of ends by itself
    if role == "drive":
        print(json.dumps(drive(spec)), flush=True)
    else:
        rpc_server(spec)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        _role()
    else:
        main()
