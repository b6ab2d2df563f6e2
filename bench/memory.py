"""Benchmark 5, memory: the server's peak RSS with 1, 16 and 64 joined workers of a 25 MiB model.

    python -m bench.memory
    BENCH_MEMORY_FLAGS="--receive-window 1" python -m bench.memory   # flags for the server

Policy gap-aware, which keeps every worker's θ⁽ⁱ⁾: float32 snapshots with the default 4 MiB receive
windows and with ``--receive-window 1``, and bfloat16 snapshots. Every
worker joins and pulls, then all push-and-pull at once (one thread each), so that the server
holds every snapshot and a burst of gradients. The peak (``VmHWM``) is reported as is and, in
model sizes, above the runtime: the peak of the same server, with as many workers making the same
streamed calls, holding a 64 KiB model (Python, torch, gRPC, and what each connection costs
whatever the model). Target (issue 7): ≤ (workers + 4) model sizes in float32 mode.
"""
from __future__ import annotations

import os
import threading

import torch

from bench.harness import gapaware_server, machine_line, print_table, quick_or, size_label
from bench.models import MIB
from gapaware import WorkerClient

MODEL_BYTES = quick_or(MIB, 25 * MIB)
WORKERS = quick_or([1, 4], [int(w) for w in os.environ.get("BENCH_MEMORY_WORKERS", "1,16,64").split(",")])
SETTINGS = (("float32", ()), ("float32", ("--receive-window", "1")), ("bfloat16", ()))
"""Snapshot dtype and server flags of each row."""
RUNTIME_MODEL_BYTES = 64 * 1024
SERVER_FLAGS = os.environ.get("BENCH_MEMORY_FLAGS", "").split()  # e.g. "--receive-window 1"


def rss_bytes(pid: int, field: str) -> int:
    """``VmRSS`` or ``VmHWM`` of process ``pid`` in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for process {pid}")


def peak_rss(nbytes: int, workers: int, snapshot_dtype: str, flags: tuple[str, ...] = ()) -> int:
    """The server's peak RSS after ``workers`` joined, pulled, and pushed at once."""
    with gapaware_server(nbytes, "--policy", "gap-aware", "--threads", "1", "--snapshot-dtype", snapshot_dtype,
                         *flags, *SERVER_FLAGS) as server:
        # Streamed calls whatever the model's size: a small model would otherwise travel whole
        # (PullWhole/PushPullWhole), and the runtime baseline would not run the same code.
        clients = [WorkerClient(server.address) for _ in range(workers)]
        try:
            versions = []
            for client in clients:
                client.join()
                versions.append(client.pull()[0])
            grad = torch.full((nbytes // 4,), 1e-6)
            threads = [threading.Thread(target=client.push_pull, args=(grad, version))
                       for client, version in zip(clients, versions)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=600)
            return rss_bytes(server.proc.pid, "VmHWM")
        finally:
            for client in clients:
                client.close()


def main() -> None:
    print(f"memory benchmark: {machine_line()}" + (f", server flags {' '.join(SERVER_FLAGS)}" if SERVER_FLAGS else ""))
    rows = []
    for workers in WORKERS:
        runtime = peak_rss(RUNTIME_MODEL_BYTES, workers, "float32")
        for snapshot_dtype, flags in SETTINGS:
            peak = peak_rss(MODEL_BYTES, workers, snapshot_dtype, flags)
            above = (peak - runtime) / MODEL_BYTES
            rows.append([workers, snapshot_dtype, " ".join(flags) or "-", peak / MIB, runtime / MIB, above,
                         workers + 4, "yes" if above <= workers + 4 else "NO"])
    print_table(f"server peak RSS, {size_label(MODEL_BYTES)} model, gap-aware; runtime: the same server, workers "
                f"and calls with a {size_label(RUNTIME_MODEL_BYTES)} model; target ≤ workers + 4 models in float32",
                ["workers", "snapshots", "server flags", "peak MiB", "runtime MiB", "models above runtime", "target",
                 "within"], rows)


if __name__ == "__main__":
    main()
