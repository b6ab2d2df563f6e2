"""The worker's training loop: pull → forward/backward on a batch → push, until the run ends.

Built on :class:`~gapaware.worker.client.WorkerClient`; one round trip a step (the
push returns the parameters the update produced).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from gapaware.common.allocator import keep_freed_memory
from gapaware.common.config import RunConfig
from gapaware.common.data import batches
from gapaware.common.layout import ParamLayout, flat_gradients, load_flat_parameters
from gapaware.common.tasks import load_task
from gapaware.worker.client import WorkerClient

log = logging.getLogger("gapaware.worker")


@dataclass(frozen=True)
class WorkerOptions:
    server: str
    device: str = "cpu"
    batch_size: int | None = None     # None: the run's batch size
    task: str | None = None           # None: the task the server runs
    data_dir: str | None = None
    threads: int = 1                  # torch intra-op threads for this process
    transport_dtype: str = "float32"


@dataclass(frozen=True)
class WorkerSummary:
    worker_id: int
    steps: int
    last_version: int


def run_worker(options: WorkerOptions) -> WorkerSummary:
    torch.set_num_threads(options.threads)
    keep_freed_memory()
    with WorkerClient(options.server, transport_dtype=options.transport_dtype) as client:
        config = RunConfig.from_json(client.status().run_config_json)
        task = load_task(options.task or config.task, seed=config.seed,
                         data_dir=options.data_dir or config.data_dir)
        model = task.model.to(options.device)
        model.train()
        info = client.join(ParamLayout.from_module(model), device=options.device)
        log.info("worker %d joined %s (task %s, policy %s)", info.worker_id, options.server,
                 config.task, config.policy)
        data = batches(task.train, options.batch_size or config.batch_size,
                       seed=config.seed * 1_000_003 + info.worker_id)
        version, theta = client.pull()
        steps = 0
        finished = info.finished
        while not finished:
            load_flat_parameters(model, theta)
            inputs, targets = (t.to(options.device, non_blocking=True) for t in next(data))
            model.zero_grad(set_to_none=True)
            loss = task.loss(model(inputs), targets)
            loss.backward()
            result, version, theta = client.push_pull(flat_gradients(model), version,
                                                      samples=len(targets), loss=loss.item())
            steps += 1
            finished = result.finished
        client.leave()
        log.info("worker %d done after %d steps (server version %d)", info.worker_id, steps, version)
        return WorkerSummary(info.worker_id, steps, version)
