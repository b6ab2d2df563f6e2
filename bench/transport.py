"""Benchmark 1, transport: pull and push of flat float32 vectors through the real server and
client, against a raw TCP transfer of the same bytes in the same run.

    python -m bench.transport

Target (issue 7): ≥ 0.6× raw TCP in both directions at 25 and 100 MiB. The server runs plain
ASGD without momentum so that the update costs next to nothing; a push is timed on its own
(a pull before each one, untimed, since every push must follow a pull).
"""
from __future__ import annotations

import time

import torch

from bench.harness import gapaware_server, machine_line, median, print_table, quick_or, size_label, timed
from bench.models import MIB
from bench.raw_tcp import RawTcpPeer
from gapaware import WorkerClient

SIZES = quick_or([64 * 1024, MIB], [MIB, 25 * MIB, 100 * MIB])
REPEATS = quick_or(2, 7)


def raw_tcp_seconds(nbytes: int) -> tuple[float, float]:
    """Median seconds of a raw TCP push and pull of ``nbytes``."""
    payload = memoryview(bytearray(nbytes))
    with RawTcpPeer() as peer:
        peer.push(payload)
        peer.pull(payload)
        push = median(timed(lambda: peer.push(payload), REPEATS))
        pull = median(timed(lambda: peer.pull(payload), REPEATS))
    return push, pull


def gapaware_seconds(nbytes: int, transport_dtype: str = "float32") -> tuple[float, float]:
    """Median seconds of a gapaware push and pull of a model of ``nbytes`` (float32 size)."""
    with gapaware_server(nbytes, "--policy", "asgd", "--momentum", "0") as server, \
            WorkerClient(server.address, transport_dtype=transport_dtype) as client:
        client.join()
        version, theta = client.pull()
        grad = torch.full_like(theta, 1e-9)
        pulls, pushes = [], []
        for _ in range(REPEATS + 1):
            start = time.perf_counter()
            version, _ = client.pull()
            middle = time.perf_counter()
            client.push(grad, version)
            pulls.append(middle - start)
            pushes.append(time.perf_counter() - middle)
        return median(pushes[1:]), median(pulls[1:])


def main() -> None:
    print(f"transport benchmark: {machine_line()}")
    rows = []
    for nbytes in SIZES:
        raw_push, raw_pull = raw_tcp_seconds(nbytes)
        push, pull = gapaware_seconds(nbytes)
        gbps = lambda seconds: nbytes / seconds / 1e9  # noqa: E731
        rows.append([size_label(nbytes), gbps(raw_push), gbps(push), raw_push / push,
                     gbps(raw_pull), gbps(pull), raw_pull / pull])
    print_table(f"GB/s, median of {REPEATS}; ratio = gapaware ÷ raw TCP (target ≥ 0.6 at 25 and 100 MiB)",
                ["size", "raw push", "gapaware push", "push ratio", "raw pull", "gapaware pull", "pull ratio"],
                rows)


if __name__ == "__main__":
    main()
