"""Benchmark 2, server update: time per update of each policy on 25 M parameters, against a
memory-copy bound measured in the same run, and the GA/ASGD time ratio.

    python -m bench.server_update

The bound of a policy is the bytes its update must read and write (the float32 tensors below,
each touched once) divided by the copy bandwidth of this machine (``dst.copy_(src)`` on
tensors of the same size: one read and one write per element). Targets (issue 7): every
policy ≥ 0.5× its bound; GA at most 2× ASGD. Momentum 0.9, no weight decay, one torch thread
for the updates and the copy alike, as the server runs them (``--threads 1``; set
``BENCH_THREADS`` to try more).

GA and DANA-GA run in the fused kernel (server/policies/fused.py) when it builds; the rows
"(torch ops)" time the same updates with ``GAPAWARE_FUSED=0``, the element-wise torch
operations the server falls back to. The rows "(guarded)" time the server's whole update
(:meth:`gapaware.server.updater.Updater.apply` under ``--nonfinite reject``): the policy's update
keeping θ's previous values in the gradient's buffer, and the check that θ came out finite, which
undoes an update that left NaN or Inf (docs/ALGORITHMS.md#bounding-a-push); the gradient's norm,
computed outside the server's lock, is timed on its own. The rows take turns push by push (about 4 GB of tensors
in all), so a change of load on a shared machine hits them alike.
"""
from __future__ import annotations

import os
from unittest import mock

import torch

from bench.harness import machine_line, median, print_table, quick_or, timed
from gapaware.common.config import RunConfig
from gapaware.server.policies import fused, make_policy
from gapaware.server.push import admit
from gapaware.server.push_bound import gradient_norm
from gapaware.server.updater import Updater

NUMEL = quick_or(1 << 18, 25_000_000)
REPEATS = quick_or(3, 15)
WORKERS = 4
# Tensors of NUMEL float32 each update must (read, write): ASGD reads g, buf, θ and writes
# buf, θ; GA adds v (read and write) and θ⁽ⁱ⁾; DANA reads g, vⁱ, Σv, θ and writes vⁱ, Σv, θ;
# DANA-GA adds v and θ̂ as GA does.
TRAFFIC = {"asgd": (3, 2), "staleness-aware": (3, 2), "gap-aware": (5, 3), "dana": (4, 3), "dana-ga": (6, 4)}
ROWS = [(name, name, True, False) for name in TRAFFIC] + [
    (f"{name} (torch ops)", name, False, False) for name in ("gap-aware", "dana-ga")] + [
    (f"{name} (guarded)", name, True, True) for name in ("asgd", "gap-aware")]
"""(label, policy, fused kernel on, through the server's guarded update) of each row."""


def copy_bandwidth() -> float:
    """Bytes a second that ``copy_`` reads plus writes on tensors of NUMEL float32."""
    src, dst = torch.randn(NUMEL), torch.empty(NUMEL)
    dst.copy_(src)
    seconds = median(timed(lambda: dst.copy_(src), REPEATS))
    return 2 * NUMEL * 4 / seconds


def pusher(name: str, theta: torch.Tensor, grads: list[torch.Tensor], snapshots: list[torch.Tensor],
           guarded: bool):
    """A function that applies the next push to ``theta`` with a new policy ``name``, workers taking
    turns; ``guarded``: through the server's updater, on gradients of its own (it writes into them)."""
    turn = iter(range(1_000_000))
    if guarded:
        updater = Updater(RunConfig(policy=name, lr=0.05, momentum=0.9, schedule="constant", max_updates=10**9),
                          NUMEL, 10**9, nonfinite="reject")
        own = [grad.clone() for grad in grads]

        def push() -> None:
            worker = next(turn) % WORKERS
            updater.apply(theta, admit(worker, own[worker], numel=NUMEL, base_version=updater.version),
                          snapshots[worker] if updater.policy.needs_snapshot else None)

        return push
    policy = make_policy(name, NUMEL, momentum=0.9)

    def push() -> None:
        worker = next(turn) % WORKERS
        policy.apply(theta, grads[worker], lr=0.05, staleness=WORKERS - 1,
                     stale_theta=snapshots[worker] if policy.needs_snapshot else None, worker_id=worker)

    return push


def update_seconds() -> dict[str, float]:
    """Median seconds of one push for each row. The rows take turns push by push, so that every
    row sees the same load; every row has θ of its own, and all share the gradients and θ⁽ⁱ⁾."""
    theta = torch.randn(NUMEL)
    grads = [torch.randn(NUMEL) * 1e-3 for _ in range(WORKERS)]
    snapshots = [theta.clone() for _ in range(WORKERS)]
    pushes = {label: pusher(name, theta.clone(), grads, snapshots, guarded) for label, name, _, guarded in ROWS}
    times: dict[str, list[float]] = {label: [] for label, *_ in ROWS}
    with mock.patch.dict(os.environ):
        for repeat in range(-WORKERS, REPEATS):  # the first WORKERS rounds warm up, not timed
            for label, _, fused_on, _ in ROWS:
                os.environ[fused.SWITCH] = "1" if fused_on else "0"
                seconds = timed(pushes[label], 1)
                if repeat >= 0:
                    times[label] += seconds
    return {label: median(values) for label, values in times.items()}


def main() -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    print(f"server update benchmark: {machine_line()}, torch threads {torch.get_num_threads()}")
    print(f"GA and DANA-GA: {'the fused kernel' if fused.kernel() else 'torch ops (no fused kernel: see the log)'}")
    bandwidth = copy_bandwidth()
    seconds = update_seconds()
    rows = []
    for label, name, *_ in ROWS:
        reads, writes = TRAFFIC[name]
        bound = (reads + writes) * NUMEL * 4 / bandwidth
        rows.append([label, seconds[label] * 1e3, bound * 1e3, bound / seconds[label], seconds[label] / seconds["asgd"]])
    print_table(f"{NUMEL / 1e6:g} M parameters, median of {REPEATS}; copy bandwidth {bandwidth / 1e9:.1f} GB/s "
                f"(read + write); targets: bound ratio ≥ 0.5, GA ÷ ASGD ≤ 2",
                ["policy", "ms/update", "copy-bound ms", "bound ratio", "÷ ASGD"], rows)
    grad = torch.randn(NUMEL)
    norm_ms = median(timed(lambda: gradient_norm(grad), REPEATS)) * 1e3
    print(f"\nguarded ÷ plain: asgd {seconds['asgd (guarded)'] / seconds['asgd']:.2f}, gap-aware "
          f"{seconds['gap-aware (guarded)'] / seconds['gap-aware']:.2f}; the gradient's norm (outside the lock) "
          f"{norm_ms:.1f} ms")


if __name__ == "__main__":
    main()
