"""One rank of synchronous data-parallel training with PyTorch's own DistributedDataParallel, the
reference :mod:`bench.time_to_accuracy` measures gapaware against.

It is what a torchrun-launched script does: one process per rank with ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` set, ``init_process_group("gloo")`` (a file store and ``GLOO_SOCKET_IFNAME=lo``, so
nothing listens beyond loopback), the task's model wrapped in ``DistributedDataParallel`` (gradients
all-reduced and averaged inside ``backward``), SGD with momentum, and each rank's share of every
epoch from a ``DistributedSampler``. After each step the rank waits out its emulated delay
(:mod:`gapaware.worker.delay`, the same draws as gapaware's worker of the same rank), so the
all-reduce of the next step waits for the slowest rank, as a real straggler makes it wait.

Rank 0 saves the parameters at most every ``snapshot_seconds`` (after a step, when they change),
with the time; they are evaluated after the run, so evaluation costs the training nothing. The run
has no end of its own: the benchmark kills the ranks at its budget (a rank blocked in an all-reduce
could not act on a signal). A rank whose loss is not finite exits with :data:`DIVERGED`.
"""
from __future__ import annotations

import itertools
import math
import os
import sys
import threading
import time
from pathlib import Path

import torch
import torch._dynamo.aot_compile  # noqa: F401  DDP's constructor imports it, at length: once, in the fork server
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

from gapaware.common.layout import flat_parameters
from gapaware.common.tasks import load_task
from gapaware.worker.delay import DelaySpec

DIVERGED = 3


def run_rank(rank: int, world_size: int, store: str, task_name: str, lr: float, warmup_steps: int,
             batch_size: int, delay: str, snapshot_dir: str, snapshot_seconds: float, log_path: str) -> None:
    """Trains as rank ``rank`` of ``world_size`` until killed (a multiprocessing target)."""
    with open(log_path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    task = load_task(task_name, seed=0)  # the initial parameters gapaware's server starts from
    model = DistributedDataParallel(task.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    inputs, targets = task.train.tensors
    sampler = DistributedSampler(task.train, num_replicas=world_size, rank=rank, shuffle=True, seed=0)
    delays = DelaySpec.parse(delay).sampler(rank)
    never = threading.Event()
    snapshots = _Snapshots(Path(snapshot_dir), snapshot_seconds, task.model) if rank == 0 else None
    step = 0
    for epoch in itertools.count():
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler))
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            for group in optimizer.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps else lr
            optimizer.zero_grad(set_to_none=True)
            loss = task.loss(model(inputs[batch]), targets[batch])
            loss.backward()
            optimizer.step()
            step += 1
            if not math.isfinite(loss.item()):
                print(f"rank {rank}: loss {loss.item()} at step {step}: diverged", flush=True)
                sys.exit(DIVERGED)
            if snapshots:
                snapshots.maybe_save(step)
            delays.wait(never)


class _Snapshots:
    """Rank 0's parameters, saved with their time at most every ``seconds``."""

    def __init__(self, directory: Path, seconds: float, model: torch.nn.Module) -> None:
        self._directory = directory
        self._seconds = seconds
        self._model = model
        self._last = -math.inf
        self.maybe_save(0)

    def maybe_save(self, step: int) -> None:
        now = time.time()
        if now - self._last < self._seconds:
            return
        self._last = now
        path = self._directory / f"step-{step:08d}.pt"
        torch.save({"time": now, "step": step, "theta": flat_parameters(self._model)}, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").rename(path)  # a kill mid-write leaves no torn snapshot
