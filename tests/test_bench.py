"""The benchmarks run (``BENCH_QUICK=1``: tiny sizes) and print finite figures. No timing is checked."""
import math
import os
import re
import subprocess
import sys

import pytest

BENCHMARKS = ["transport", "server_update", "end_to_end", "scale", "memory", "overlap"]


def table_rows(output: str) -> list[list[str]]:
    """The rows under the dashed line of the table the benchmark printed."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if re.fullmatch(r"\s*[- ]+", line) and "-" in line)
    return [line.split() for line in lines[start + 1:] if line.strip() and not line.startswith("  error")]


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_runs_and_prints_finite_figures(name):
    done = subprocess.run([sys.executable, "-m", f"bench.{name}"], env={**os.environ, "BENCH_QUICK": "1"},
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = table_rows(done.stdout)
    assert rows, done.stdout
    numbers = [float(cell) for row in rows for cell in row if re.fullmatch(r"-?[\d.]+(e[-+]?\d+)?", cell)]
    assert numbers and all(math.isfinite(x) and x >= 0 for x in numbers), done.stdout
    assert "nan" not in {cell for row in rows for cell in row}, done.stdout
    if name == "scale":
        assert rows[0][-1] == "0", f"the load generator saw errors:\n{done.stdout}"
