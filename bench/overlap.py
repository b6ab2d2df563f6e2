"""Benchmark 6, overlap: steps a second of one real ``gapaware worker`` process whose batches are
slow to load, with the batches loaded ahead in a thread (``--prefetch-batches 2``, the default)
and in the training thread (``--prefetch-batches 0``).

    python -m bench.overlap

The task is digits-mlp with every training example waiting 50 µs (about 0.14 ms) to load
(:func:`bench.models.slow_loading_digits`, a stand-in for a data set on a network file system):
a step's compute and round trip then cost about as much as loading its batch, the case where
overlapping them matters. The two settings alternate, each run a fresh worker against the
same server; the rate is the server's versions a second over a measured window.
"""
from __future__ import annotations

import itertools
import tempfile
import time
from pathlib import Path

from bench.harness import machine_line, median, print_table, quick_or
from bench.models import slow_loading_digits
from gapaware import WorkerClient
from gapaware.common.data import batches
from gapaware.processes import ServerProcess, start_worker

SETTINGS = (2, 0)
SECONDS = quick_or(1.0, 6.0)
REPEATS = quick_or(1, 3)
WARMUP_UPDATES = 20
BATCH_SIZE = 32


def loading_seconds_per_batch(count: int = quick_or(5, 30)) -> float:
    """What loading one batch of the run's size costs, measured here."""
    data = batches(slow_loading_digits().train, BATCH_SIZE, seed=0)
    start = time.perf_counter()
    for _ in itertools.islice(data, count):
        pass
    return (time.perf_counter() - start) / count


def steps_per_second(server: ServerProcess, client: WorkerClient, workdir: Path, prefetch: int) -> float:
    worker = start_worker(server.address, workdir, prefetch, "--prefetch-batches", str(prefetch))
    try:
        warm = client.status().version + WARMUP_UPDATES
        deadline = time.monotonic() + 120
        while client.status().version < warm:
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker made no progress:\n{(workdir / f'worker-{prefetch}.log').read_text()}")
            time.sleep(0.05)
        first = client.status().version
        start = time.perf_counter()
        time.sleep(SECONDS)
        last = client.status().version
        return (last - first) / (time.perf_counter() - start)
    finally:
        worker.terminate()
        worker.wait(timeout=60)


def main() -> None:
    print(f"overlap benchmark: {machine_line()}")
    loading = loading_seconds_per_batch()
    rates: dict[int, list[float]] = {setting: [] for setting in SETTINGS}
    with tempfile.TemporaryDirectory(prefix="gapaware-bench-") as workdir:
        server = ServerProcess(Path(workdir), "--task", "bench.models:slow_loading_digits",
                               "--batch-size", str(BATCH_SIZE), "--max-updates", "1000000000",
                               "--eval-every", "1000000000", "--log-level", "warning")
        try:
            with WorkerClient(server.address, timeout=10) as client:
                for repeat in range(REPEATS):
                    order = SETTINGS if repeat % 2 == 0 else SETTINGS[::-1]
                    for setting in order:
                        rates[setting].append(steps_per_second(server, client, Path(workdir), setting))
        finally:
            server.kill()
    ahead, inline = median(rates[2]), median(rates[0])
    print_table(f"One worker, digits-mlp, batches of {BATCH_SIZE} taking {loading * 1e3:.1f} ms each to load "
                f"(median of {REPEATS} runs of {SECONDS:g} s)",
                ("prefetch 2 steps/s", "prefetch 0 steps/s", "ratio"), [(ahead, inline, ahead / inline)])


if __name__ == "__main__":
    main()
