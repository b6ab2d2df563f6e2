"""Benchmark 10, shards: round trips a second and bytes a second through S = 1, 2 and 4 sharded servers
(``gapaware server --shard I/S``) at 25 and 100 MiB with 4 and 16 workers, and the servers' CPU per
round trip, side by side in one run.

    python -m bench.shards
    BENCH_MIB=100 BENCH_WORKERS=16 BENCH_SHARDS=1,4 BENCH_REPEATS=1 python -m bench.shards    # a subset

Two kinds of worker, each its own process doing nothing but round trips (a push and pull of the whole
model, every shard at once):

* ``client``: :class:`~gapaware.worker.sharded.ShardedClient`, as ``gapaware worker`` runs it: it encodes
  the gradient and checks and assembles the parameters it receives, every step;
* ``light``: a load generator that sends a gradient encoded once, before the run, and drops the
  parameters it receives unchecked: the least a worker can cost, so that on a machine where workers
  and servers share the cores, the servers' scaling shows.

A round trip moves the model twice (gradient in, parameters out): bytes/s is round trips/s × 2 × the
model's size. Server CPU is every shard process's, summed, per round trip. Every server runs ASGD with
momentum on one torch thread. Target (issue 23): at 100 MiB with 16 workers, S = 4 at least 3× the
round trips of S = 1 where the machine has the cores; on 2 cores, S = 2 not slower than S = 1.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import threading
from collections.abc import Iterator

import torch

from bench.end_to_end import CTX, FAILED, Run, _measure, _run_processes, median_run
from bench.harness import gapaware_server, machine_line, print_table, quick_or, size_label
from bench.models import MIB
from gapaware.common.layout import ParamLayout
from gapaware.common.transport import TransportError, encode
from gapaware.proto import parameter_server_pb2 as pb
from gapaware.worker.client import WorkerClient
from gapaware.worker.sharded import ShardedClient


def _listed(name: str, default: list[int]) -> list[int]:
    return [int(n) for n in os.environ[name].split(",")] if os.environ.get(name) else default


SIZES = [mib * MIB for mib in _listed("BENCH_MIB", [])] or quick_or([64 * 1024], [25 * MIB, 100 * MIB])
WORKERS = _listed("BENCH_WORKERS", quick_or([2], [4, 16]))
SHARDS = _listed("BENCH_SHARDS", quick_or([1, 2], [1, 2, 4]))
KINDS = ("client", "light")
SECONDS = quick_or(1.0, 3.0)
REPEATS = int(os.environ.get("BENCH_REPEATS", quick_or(1, 2)))


def _layout(nbytes: int) -> ParamLayout:
    """The layout of bench.models' flat model of ``nbytes``: one parameter, ``weight``."""
    return ParamLayout(("weight",), ((nbytes // 4,),))


def _client_worker(addresses: list[str], nbytes: int, barrier, seconds: float, results) -> None:
    torch.set_num_threads(1)
    with ShardedClient(addresses) as client:
        client.join(_layout(nbytes))
        version, theta = client.pull()
        grad = torch.full_like(theta, 1e-6)

        def step() -> None:
            nonlocal version
            _, version, _ = client.push_pull(grad, version, out=theta)

        _measure(step, barrier, seconds, results)
        client.leave()


class PreEncodedShard:
    """One shard of the light load generator: its slice of the gradient encoded once; each round trip
    sends those frames and drops the reply's chunks unread."""

    def __init__(self, client: WorkerClient, grad: torch.Tensor) -> None:
        self.client = client
        self.tensor, chunks = encode(grad)
        self.chunks = list(chunks)
        self.version = client.pull()[0]
        self.seq = 0

    def push_pull(self) -> None:
        info = self.client.info
        self.seq += 1
        header = pb.PushHeader(worker_id=info.worker_id, worker_secret=info.worker_secret, seq=self.seq,
                               base_version=self.version, tensor=self.tensor, pull=True)
        ready = threading.Event()  # the chunks go once the server's ready frame admitted the push

        def requests() -> Iterator:
            yield pb.PushFrame(header=header)
            ready.wait()
            yield from self.chunks

        replies = iter(self.client._push_frames(requests(), timeout=120))
        try:
            if not isinstance(next(replies, None), pb.PushReady):
                raise TransportError("the server's reply to a push did not start with its ready frame")
        finally:
            ready.set()
        self.version = next(replies).version
        for _ in replies:
            pass


def _light_worker(addresses: list[str], nbytes: int, barrier, seconds: float, results) -> None:
    torch.set_num_threads(1)
    with ShardedClient(addresses) as sharded:
        sharded.join(_layout(nbytes))
        grad = torch.full((nbytes // 4,), 1e-6)
        shards = [PreEncodedShard(client, sharded._slice(grad, index)) for index, client in enumerate(sharded.shards)]
        del grad

        def step() -> None:
            sharded._each(lambda index, client: shards[index].push_pull())

        _measure(step, barrier, seconds, results)
        sharded.leave()


def run(kind: str, nbytes: int, workers: int, shards: int, seconds: float = SECONDS) -> Run:
    """One run of ``workers`` of ``kind`` against ``shards`` servers of a model of ``nbytes``."""
    started, results = CTX.Event(), CTX.Queue()
    barrier = CTX.Barrier(workers, action=started.set)
    target = _client_worker if kind == "client" else _light_worker
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(gapaware_server(nbytes, "--policy", "asgd", "--momentum", "0.9", "--threads",
                                                       "1", "--shard", f"{index}/{shards}"))
                   for index in range(shards)]
        addresses = [server.address for server in servers]
        processes = [CTX.Process(target=target, args=(addresses, nbytes, barrier, seconds, results))
                     for _ in range(workers)]
        return _run_processes(processes, started, results, workers, lambda: [s.proc.pid for s in servers])


def main() -> None:
    print(f"shards benchmark: {machine_line()}")
    runs: dict[tuple, list[Run]] = {}
    for repeat in range(REPEATS):
        order = SHARDS[repeat % len(SHARDS):] + SHARDS[:repeat % len(SHARDS)]
        for kind, nbytes, workers in itertools.product(KINDS, SIZES, WORKERS):
            for shards in order:
                try:
                    outcome = run(kind, nbytes, workers, shards)
                except RuntimeError as error:
                    print(f"  {kind} {size_label(nbytes)} × {workers}, S={shards}: {error}")
                    outcome = FAILED
                runs.setdefault((kind, nbytes, workers, shards), []).append(outcome)
    rows = []
    for kind, nbytes, workers in itertools.product(KINDS, SIZES, WORKERS):
        medians = {s: median_run(runs[kind, nbytes, workers, s]) for s in SHARDS}
        base = medians[SHARDS[0]].per_second
        for shards in SHARDS:
            m = medians[shards]
            rows.append([kind, size_label(nbytes), workers, shards, m.per_second, m.per_second * 2 * nbytes / MIB,
                         m.per_second / base, m.server_cpu_ms, m.worker_cpu_ms])
    print_table(f"round trips/s summed over workers, median of {REPEATS} alternating runs of {SECONDS:g} s; "
                f"÷ S={SHARDS[0]}: the same workers against S={SHARDS[0]}; CPU ms per round trip, every shard "
                "summed, and every worker; target: S=4 ≥ 3× S=1 at 100 MiB × 16 with the cores, S=2 ≥ S=1 on 2",
                ["workers", "model", "n", "S", "round trips/s", "MiB/s", f"÷ S={SHARDS[0]}", "server CPU ms",
                 "worker CPU ms"], rows)


if __name__ == "__main__":
    main()
