"""Benchmark 1, transport: pull and push of flat float32 vectors through the real server and
client, against a raw TCP transfer of the same bytes in the same run.

    python -m bench.transport

Target (issue 7): ≥ 0.6× raw TCP in both directions at 25 and 100 MiB. The server runs plain
ASGD without momentum so that the update costs next to nothing. Each round times a raw push,
a raw pull, a gapaware pull and a gapaware push (every push must follow a pull) in turn.
"""
from __future__ import annotations

import time

import torch

from bench.harness import gapaware_server, machine_line, median, print_table, quick_or, size_label
from bench.models import MIB
from bench.raw_tcp import RawTcpPeer
from gapaware import WorkerClient
from gapaware.common.allocator import keep_freed_memory

SIZES = quick_or([64 * 1024, MIB], [MIB, 25 * MIB, 100 * MIB])
REPEATS = quick_or(2, 7)


def seconds_side_by_side(nbytes: int) -> dict[str, float]:
    """Median seconds of a raw TCP push and pull of ``nbytes`` and of a gapaware push and pull of a
    model of ``nbytes``, measured in alternation so that the machine's drift hits all four."""
    payload = memoryview(bytearray(nbytes))
    times: dict[str, list[float]] = {"raw push": [], "raw pull": [], "push": [], "pull": []}
    with RawTcpPeer() as peer, gapaware_server(nbytes, "--policy", "asgd", "--momentum", "0") as server, \
            WorkerClient(server.address) as client:
        client.join()
        grad = torch.full((nbytes // 4,), 1e-9)
        received = torch.empty(nbytes // 4)  # reused every round, as the worker loop does
        for repeat in range(REPEATS + 1):  # the first round warms up and is dropped
            start = time.perf_counter()
            peer.push(payload)
            middle = time.perf_counter()
            peer.pull(payload)
            end = time.perf_counter()
            version, _ = client.pull(out=received)
            after_pull = time.perf_counter()
            client.push(grad, version)
            after_push = time.perf_counter()
            if repeat:
                times["raw push"].append(middle - start)
                times["raw pull"].append(end - middle)
                times["pull"].append(after_pull - end)
                times["push"].append(after_push - after_pull)
    return {name: median(values) for name, values in times.items()}


def main() -> None:
    keep_freed_memory()  # what `gapaware worker` does
    print(f"transport benchmark: {machine_line()}")
    rows = []
    for nbytes in SIZES:
        seconds = seconds_side_by_side(nbytes)
        raw_push, raw_pull, push, pull = (seconds[k] for k in ("raw push", "raw pull", "push", "pull"))
        gbps = lambda seconds: nbytes / seconds / 1e9  # noqa: E731
        rows.append([size_label(nbytes), gbps(raw_push), gbps(push), raw_push / push,
                     gbps(raw_pull), gbps(pull), raw_pull / pull])
    print_table(f"GB/s, median of {REPEATS} alternating rounds; ratio = gapaware ÷ raw TCP (target ≥ 0.6 at 25 and 100 MiB)",
                ["size", "raw push", "gapaware push", "push ratio", "raw pull", "gapaware pull", "pull ratio"],
                rows)


if __name__ == "__main__":
    main()
