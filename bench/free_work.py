"""Benchmark 7, a bound rather than a target: could gapaware meet the end-to-end targets it misses
(benchmark 3) by doing its own work faster? Two answers, measured in one run:

    python -m bench.free_work

1. "gapaware, free": gapaware with the CRC-32C checksums, the checks that a gradient and an update's
   result are finite, the push bound's norm and the update each replaced by a no-op, in the server
   and in every worker. The bytes on the wire are the
   same; what it still spends is gRPC, Python, and the copies and casts between tensors and
   messages. It runs beside PyTorch RPC over TCP, the gRPC floor (:mod:`bench.grpc_floor`, with
   messages of the transport dtype's size, doing nothing with them) and gapaware as it is,
   alternating, their order rotating every repeat, as in benchmark 3; medians of the repeats.
2. "floor + work": the floor's rate with the work no design can skip added to it, each piece
   measured alone in this process, over and over on the same tensors (caches as warm as they get):
   the four checksums of a round trip (the push and the reply, each made and checked), the
   finiteness check, the update (SGD with momentum, as benchmark 3 runs), and one copy or cast of
   the tensor per message per side. One worker waits for all of it in turn: 1 ÷ (1 ÷ floor rate + work). Several share the
   CPU the floor got: floor rate × floor CPU ÷ (floor CPU + work), per round trip. Both are
   optimistic: warm caches, no Python, no bookkeeping, every copy fused into the framing.

The cases are benchmark 3's where the targets are missed: float32 at 1 MiB with one worker and four
(target ≥ 1.2× RPC over TCP), and 25 MiB with four workers in float32 (≥ 0.8×) and bfloat16 (≥ 1.3×).

``python -m bench.free_work exec PYTHON -m gapaware ARGS...`` runs ``gapaware ARGS...`` in this
process with the arithmetic made free: the command the free server runs under.
"""
from __future__ import annotations

import contextlib
import functools
import sys
import time
from collections.abc import Callable, Iterator
from unittest import mock

import crc32c
import torch

from bench.end_to_end import FAILED, Run, median_run, run
from bench.harness import machine_line, median, print_table, quick_or, size_label
from bench.models import MIB
from gapaware.cli import main as gapaware_main
from gapaware.common import transport
from gapaware.common.transport import tensor_bytes
from gapaware.server import push, updater
from gapaware.server.policies import make_policy
from gapaware.server.policies.asgd import ASGD

CASES = quick_or([(64 * 1024, 2, "float32", 1.2), (64 * 1024, 2, "bfloat16", 1.3)],
                 [(MIB, 1, "float32", 1.2), (MIB, 4, "float32", 1.2), (25 * MIB, 4, "float32", 0.8),
                  (25 * MIB, 4, "bfloat16", 1.3)])
"""(model bytes, workers, transport dtype, issue 7's target against RPC over TCP)."""
SYSTEMS = ("rpc-tcp", "grpc-floor", "gapaware", "gapaware-free")
REPEATS = quick_or(1, 3)
FREE_SERVER = (sys.executable, "-m", "bench.free_work", "exec")
WORK_REPEATS = quick_or(3, 15)
WORK = ("checksums", "finiteness", "update", "copies")


@contextlib.contextmanager
def free_arithmetic() -> Iterator[None]:
    """This process (and those it forks meanwhile) with gapaware's checksums, finiteness checks, the
    push bound's norm and the update replaced by no-ops: every checksum is 0, every gradient and
    result finite, every norm 0, and θ never changes."""
    with mock.patch.object(crc32c, "crc32c", lambda data, value=0: value), \
            mock.patch.object(transport, "all_finite", lambda tensor: True), \
            mock.patch.object(push, "all_finite", lambda tensor: True), \
            mock.patch.object(updater, "all_finite", lambda tensor: True), \
            mock.patch.object(updater, "gradient_norm", lambda tensor: 0.0), \
            mock.patch.object(ASGD, "apply", lambda self, theta, grad, **kwargs: 1.0):
        yield


def _alone_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` called over and over."""
    times = []
    for _ in range(WORK_REPEATS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * median(times)


@functools.cache
def work_ms(nbytes: int, dtype: str) -> dict[str, float]:
    """Milliseconds of each piece of the work a round trip of a float32 model of ``nbytes`` must do
    with ``dtype`` on the wire, measured alone (see the module's docstring), keyed by :data:`WORK`."""
    torch.set_num_threads(1)
    numel, sent_dtype = nbytes // 4, torch.bfloat16 if dtype == "bfloat16" else torch.float32
    theta, grad, received = torch.randn(numel), torch.randn(numel) * 1e-3, torch.empty(numel)
    sent = torch.empty(numel, dtype=sent_dtype)
    policy = make_policy("asgd", numel, momentum=0.9)
    out_ms = _alone_ms(lambda: sent.copy_(theta))
    in_ms = _alone_ms(lambda: received.copy_(sent))
    return {
        "checksums": 4 * _alone_ms(lambda: crc32c.crc32c(tensor_bytes(sent))),
        "finiteness": _alone_ms(lambda: transport.all_finite(grad)),
        "update": _alone_ms(lambda: policy.apply(theta, grad, lr=1e-9, staleness=0)),
        "copies": 2 * (out_ms + in_ms),
    }


def floor_plus_work(floor: Run, workers: int, work: float) -> float:
    """Round trips a second of the floor's run with ``work`` milliseconds per round trip added (see the
    module's docstring)."""
    if workers == 1:
        return 1e3 / (1e3 / floor.per_second + work)
    floor_cpu = floor.server_cpu_ms + floor.worker_cpu_ms
    return floor.per_second * floor_cpu / (floor_cpu + work)


def _run_case(system: str, nbytes: int, workers: int, dtype: str) -> Run:
    gapaware = "gapaware-bf16" if dtype == "bfloat16" else "gapaware"
    if system == "grpc-floor":
        return run(system, nbytes // 2 if dtype == "bfloat16" else nbytes, workers)
    if system == "gapaware-free":
        with free_arithmetic():
            return run(gapaware, nbytes, workers, server_prefix=FREE_SERVER)
    return run(gapaware if system == "gapaware" else system, nbytes, workers)


def main() -> None:
    print(f"free-work bound: {machine_line()}")
    runs: dict[tuple, list[Run]] = {}
    for repeat in range(REPEATS):
        order = SYSTEMS[repeat % len(SYSTEMS):] + SYSTEMS[:repeat % len(SYSTEMS)]
        for case in CASES:
            for system in order:
                try:
                    outcome = _run_case(system, *case[:3])
                except RuntimeError as error:
                    print(f"  {system} {size_label(case[0])} × {case[1]} {case[2]}: {error}")
                    outcome = FAILED
                runs.setdefault((system, *case), []).append(outcome)
    rows, work_rows, cpu_rows = [], [], []
    for case in CASES:
        nbytes, workers, dtype, target = case
        medians = {system: median_run(runs[system, *case]) for system in SYSTEMS}
        rate = {system: medians[system].per_second for system in SYSTEMS}
        work = work_ms(nbytes, dtype)
        bound = floor_plus_work(medians["grpc-floor"], workers, sum(work.values()))
        rows.append([size_label(nbytes), workers, dtype, *(rate[s] for s in SYSTEMS), bound,
                     *(rate[s] / rate["rpc-tcp"] for s in ("gapaware", "gapaware-free", "grpc-floor")),
                     bound / rate["rpc-tcp"], target])
        work_rows.append([size_label(nbytes), workers, dtype, *(work[piece] for piece in WORK), sum(work.values())])
        cpu_rows.append([size_label(nbytes), workers, dtype, *(
            cpu for system in SYSTEMS for cpu in (medians[system].server_cpu_ms, medians[system].worker_cpu_ms))])
    print_table(f"round trips/s summed over workers, median of {REPEATS} alternating runs; \"free\": no checksums, "
                "finiteness check or update; the floor sends the transport dtype's bytes; \"floor + work\": a model, "
                "the floor's rate slowed by the work measured alone",
                ["model", "workers", "dtype", *SYSTEMS, "floor + work", "gapaware ÷ rpc-tcp", "free ÷ rpc-tcp",
                 "floor ÷ rpc-tcp", "floor + work ÷ rpc-tcp", "target"], rows)
    print_table(f"milliseconds of work per round trip, each piece measured alone with warm caches (median of "
                f"{WORK_REPEATS})",
                ["model", "workers", "dtype", *WORK, "total"], work_rows)
    print_table("CPU milliseconds per round trip, in the same runs (medians): the server process, and the workers' "
                "processes summed",
                ["model", "workers", "dtype", *(f"{system} {part}" for system in SYSTEMS
                                                for part in ("server", "workers"))], cpu_rows)


def _exec_free(command: list[str]) -> None:
    """Runs ``PYTHON -m gapaware ARGS...`` as ``gapaware ARGS...`` in this process, arithmetic free."""
    if command[1:3] != ["-m", "gapaware"]:
        raise SystemExit(f"usage: python -m bench.free_work exec PYTHON -m gapaware ARGS... (got {command})")
    sys.argv = ["gapaware", *command[3:]]
    with free_arithmetic():
        gapaware_main()


if __name__ == "__main__":
    if sys.argv[1:2] == ["exec"]:
        _exec_free(sys.argv[2:])
    else:
        main()
