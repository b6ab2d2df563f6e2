"""What every benchmark shares: quick mode, a server process, medians, tables and the machine's load.

``BENCH_QUICK=1`` shrinks every benchmark to a smoke test (tiny sizes, few repeats): it proves
the benchmark runs, its numbers mean nothing.
"""
from __future__ import annotations

import contextlib
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from bench.models import MIB, TASKS
from gapaware.processes import ServerProcess

QUICK = os.environ.get("BENCH_QUICK", "") not in ("", "0")


def quick_or(quick, full):
    """``quick`` in quick mode, else ``full``."""
    return quick if QUICK else full


def size_label(nbytes: int) -> str:
    return f"{nbytes / MIB:g} MiB" if nbytes >= MIB else f"{nbytes // 1024} KiB"


def machine_line() -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"load average {load}, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}{' [QUICK: numbers mean nothing]' if QUICK else ''}")


@contextlib.contextmanager
def gapaware_server(nbytes: int, *flags: str, prefix: tuple[str, ...] = ()) -> Iterator[ServerProcess]:
    """A ``gapaware server`` holding a flat model of ``nbytes`` that never ends by itself, run under
    the command ``prefix`` when given (as :class:`ServerProcess` does)."""
    with tempfile.TemporaryDirectory(prefix="gapaware-bench-") as workdir:
        server = ServerProcess(Path(workdir), "--task", TASKS[nbytes], "--max-updates", "1000000000",
                               "--eval-every", "1000000000", "--log-level", "warning", *flags, prefix=prefix)
        try:
            yield server
        finally:
            server.kill()


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    """Wall-clock seconds of each of ``repeats`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [list(map(str, header))] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    for i, row in enumerate(cells):
        print("  " + "  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)
