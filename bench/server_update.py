"""Benchmark 2, server update: time per update of each policy on 25 M parameters, against a
memory-copy bound measured in the same run, and the GA/ASGD time ratio.

    python -m bench.server_update

The bound of a policy is the bytes its update must read and write (the float32 tensors below,
each touched once) divided by the copy bandwidth of this machine (``dst.copy_(src)`` on
tensors of the same size: one read and one write per element). Targets (issue 7): every
policy ≥ 0.5× its bound; GA at most 2× ASGD. Momentum 0.9, no weight decay, one torch thread
for the updates and the copy alike, as the server runs them (``--threads 1``; set
``BENCH_THREADS`` to try more).

GA and DANA-GA take the path the server takes at this size (server/policies/fused.py:
``torch.compile`` of the reference push from 2^20 parameters on); the rows "(torch ops)" time
the same updates as plain torch operations (``GAPAWARE_COMPILE=0``), the fallback. The first
push of a compiled row compiles it; its time is printed apart and not in the medians. The rows
take turns push by push (about 4 GB of tensors in all), so a change of load on a shared machine
hits them alike.
"""
from __future__ import annotations

import os
from unittest import mock

import torch

from bench.harness import machine_line, median, print_table, quick_or, timed
from gapaware.server.policies import fused, make_policy

NUMEL = quick_or(1 << 18, 25_000_000)
REPEATS = quick_or(3, 15)
WORKERS = 4
# Tensors of NUMEL float32 each update must (read, write): ASGD reads g, buf, θ and writes
# buf, θ; GA adds v (read and write) and θ⁽ⁱ⁾; DANA reads g, vⁱ, Σv, θ and writes vⁱ, Σv, θ;
# DANA-GA adds v, θ̂ and s (the buffer that moved θ last) as reads, v as a write.
TRAFFIC = {"asgd": (3, 2), "staleness-aware": (3, 2), "gap-aware": (5, 3), "dana": (4, 3), "dana-ga": (7, 4)}
ROWS = [(name, name, None) for name in TRAFFIC] + [
    (f"{name} (torch ops)", name, "0") for name in ("gap-aware", "dana-ga")]
"""(label, policy, value of ``GAPAWARE_COMPILE``: None leaves it unset) of each row."""


def copy_bandwidth() -> float:
    """Bytes a second that ``copy_`` reads plus writes on tensors of NUMEL float32."""
    src, dst = torch.randn(NUMEL), torch.empty(NUMEL)
    dst.copy_(src)
    seconds = median(timed(lambda: dst.copy_(src), REPEATS))
    return 2 * NUMEL * 4 / seconds


def pusher(name: str, theta: torch.Tensor, grads: list[torch.Tensor], snapshots: list[torch.Tensor]):
    """A function that applies the next push to ``theta`` with a new policy ``name``, workers taking turns."""
    policy = make_policy(name, NUMEL, momentum=0.9)
    turn = iter(range(1_000_000))

    def push() -> None:
        worker = next(turn) % WORKERS
        policy.apply(theta, grads[worker], lr=0.05, staleness=WORKERS - 1,
                     stale_theta=snapshots[worker] if policy.needs_snapshot else None, worker_id=worker)

    return push


def update_seconds() -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds of one push for each row, and the seconds of each row's first push. The rows
    take turns push by push, so that every row sees the same load; every row has θ of its own, and
    all share the gradients and θ⁽ⁱ⁾."""
    theta = torch.randn(NUMEL)
    grads = [torch.randn(NUMEL) * 1e-3 for _ in range(WORKERS)]
    snapshots = [theta.clone() for _ in range(WORKERS)]
    pushes = {label: pusher(name, theta.clone(), grads, snapshots) for label, name, _ in ROWS}
    times: dict[str, list[float]] = {label: [] for label, _, _ in ROWS}
    first: dict[str, float] = {}
    with mock.patch.dict(os.environ):
        for repeat in range(-WORKERS, REPEATS):  # the first WORKERS rounds warm up, not timed
            for label, _, switch in ROWS:
                os.environ.pop(fused.SWITCH, None)
                if switch is not None:
                    os.environ[fused.SWITCH] = switch
                seconds = timed(pushes[label], 1)
                first.setdefault(label, seconds[0])
                if repeat >= 0:
                    times[label] += seconds
    return {label: median(values) for label, values in times.items()}, first


def main() -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    print(f"server update benchmark: {machine_line()}, torch threads {torch.get_num_threads()}")
    compiled = fused.compiles(NUMEL)
    print(f"GA and DANA-GA: {'torch.compile' if compiled else 'plain torch operations'} at {NUMEL} parameters")
    bandwidth = copy_bandwidth()
    seconds, first = update_seconds()
    rows = []
    for label, name, _ in ROWS:
        reads, writes = TRAFFIC[name]
        bound = (reads + writes) * NUMEL * 4 / bandwidth
        rows.append([label, seconds[label] * 1e3, bound * 1e3, bound / seconds[label], seconds[label] / seconds["asgd"]])
    print_table(f"{NUMEL / 1e6:g} M parameters, median of {REPEATS}; copy bandwidth {bandwidth / 1e9:.1f} GB/s "
                f"(read + write); targets: bound ratio ≥ 0.5, GA ÷ ASGD ≤ 2",
                ["policy", "ms/update", "copy-bound ms", "bound ratio", "÷ ASGD"], rows)
    if compiled:
        firsts = ", ".join(f"{name} {first[name]:.1f} s" for name in ("gap-aware", "dana-ga"))
        print(f"first push, compile included: {firsts}")


if __name__ == "__main__":
    main()
