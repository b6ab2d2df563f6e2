"""Benchmark 1, transport: pull and push of flat float32 vectors through the real server and
client, against a raw TCP transfer of the same bytes and against the gRPC floor
(:mod:`bench.grpc_floor`: the same calls through gRPC with nothing done to the bytes), in the same run.

    python -m bench.transport

Target (issue 7): ≥ 0.6× raw TCP in both directions at 25 and 100 MiB. The server runs plain
ASGD without momentum so that the update costs next to nothing. Each round times a raw push,
a raw pull, a floor pull, a floor push, a gapaware pull and a gapaware push (every push must
follow a pull) in turn.
"""
from __future__ import annotations

import time

import torch

from bench.grpc_floor import FloorClient, FloorServer
from bench.harness import gapaware_server, machine_line, median, print_table, quick_or, size_label
from bench.models import MIB
from bench.raw_tcp import RawTcpPeer
from gapaware import WorkerClient

SIZES = quick_or([64 * 1024, MIB], [MIB, 25 * MIB, 100 * MIB])
REPEATS = quick_or(2, 7)


def seconds_side_by_side(nbytes: int) -> dict[str, float]:
    """Median seconds of a raw TCP push and pull of ``nbytes``, of the gRPC floor's, and of a gapaware
    push and pull of a model of ``nbytes``, measured in alternation so that the machine's drift hits
    all six."""
    payload = memoryview(bytearray(nbytes))
    grad = torch.full((nbytes // 4,), 1e-9)
    received = torch.empty(nbytes // 4)  # reused every round, as the worker loop does
    with RawTcpPeer() as peer, FloorServer(nbytes) as floor_server, FloorClient(floor_server.address, nbytes) as floor, \
            gapaware_server(nbytes, "--policy", "asgd", "--momentum", "0") as server, \
            WorkerClient(server.address) as client:
        client.join()
        version = 0  # of the last pull, which the next push must name

        def pull() -> None:
            nonlocal version
            version, _ = client.pull(out=received)

        steps = {"raw push": lambda: peer.push(payload), "raw pull": lambda: peer.pull(payload),
                 "floor pull": floor.pull, "floor push": floor.push,
                 "pull": pull, "push": lambda: client.push(grad, version)}
        times: dict[str, list[float]] = {name: [] for name in steps}
        for repeat in range(REPEATS + 1):  # the first round warms up and is dropped
            for name, step in steps.items():
                start = time.perf_counter()
                step()
                if repeat:
                    times[name].append(time.perf_counter() - start)
    return {name: median(values) for name, values in times.items()}


def main() -> None:
    print(f"transport benchmark: {machine_line()}")
    rows = []
    for nbytes in SIZES:
        seconds = seconds_side_by_side(nbytes)
        gbps = {name: nbytes / value / 1e9 for name, value in seconds.items()}
        for direction in ("push", "pull"):
            raw, floor, ours = gbps[f"raw {direction}"], gbps[f"floor {direction}"], gbps[direction]
            rows.append([size_label(nbytes), direction, raw, floor, ours, ours / raw, floor / raw, ours / floor])
    print_table(f"GB/s, median of {REPEATS} alternating rounds; target: gapaware ÷ raw TCP ≥ 0.6 at 25 and 100 MiB. "
                "gRPC floor: the same calls with nothing done to the bytes (bench/grpc_floor.py)",
                ["size", "direction", "raw TCP", "gRPC floor", "gapaware", "gapaware ÷ raw", "floor ÷ raw",
                 "gapaware ÷ floor"], rows)


if __name__ == "__main__":
    main()
