"""The worker's training loop: pull → forward/backward on a batch → push, until the run ends.

Built on a :class:`~gapaware.worker.session.Session`, which retries, re-joins a server that forgot
this worker and keeps its lease; one round trip a step (the push returns the parameters the update
produced). SIGTERM or SIGINT abandons the step in progress: the worker leaves and exits 0. A
prefetch thread loads the next batches while the step computes and its round trip is in flight
(:mod:`gapaware.worker.prefetch`).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import signal
import threading
from dataclasses import dataclass, field

import torch

from gapaware.common.buffers import load_buffers
from gapaware.common.data import batches
from gapaware.common.devices import check_device
from gapaware.common.layout import ParamLayout, flat_gradients, flat_parameters, load_flat_parameters
from gapaware.common.registry import DEFAULTS
from gapaware.common.security import ClientSecurity
from gapaware.worker.delay import DelaySpec
from gapaware.worker.prefetch import Prefetcher
from gapaware.worker.progress import Progress
from gapaware.worker.retry import RetryAborted, RetryPolicy
from gapaware.worker.session import Session, load_run_task
from gapaware.worker.sharded import connect

log = logging.getLogger("gapaware.worker")


@dataclass(frozen=True)
class WorkerOptions:
    server: str                       # HOST:PORT, or every shard's, comma-separated in shard order
    device: str = "cpu"
    batch_size: int | None = None     # None: the run's batch size
    task: str | None = None           # None: the task the server runs
    data_dir: str | None = None
    threads: int = 1                  # torch intra-op threads for this process
    transport_dtype: str = DEFAULTS.transport_dtype
    push_dtype: str | None = None     # None: transport_dtype; int8 or float8: with error feedback
    pull_dtype: str | None = None     # None: transport_dtype; int8 or float8: delta pulls
    prefetch_batches: int = 2         # batches loaded ahead in a thread (worker/prefetch.py); 0: none
    rpc_timeout: float = 60.0         # seconds one call may take before it is retried
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    connect_timeout: float = 30.0     # seconds of failed first contact before giving up; 0: as retry says
    progress_every: float = 30.0      # seconds between progress lines; 0: none
    security: ClientSecurity = field(default_factory=ClientSecurity)
    delay: DelaySpec | None = None    # benchmarking: emulated straggling after each step (worker/delay.py)
    autocast: str | None = None       # "bfloat16": forward and loss under torch.autocast in that dtype


@dataclass(frozen=True)
class WorkerSummary:
    worker_id: int
    steps: int
    last_version: int
    applied: int = 0                  # pushes the server applied (retried copies not counted twice)
    joins: int = 1


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event):
    """While inside, SIGTERM and SIGINT set ``stop`` (every time: a second one does not kill).

    Signal handlers can only be installed from the main thread; elsewhere (a worker run from a
    user's thread) ``stop`` is only what the caller sets."""
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def request_stop(signum, frame):
        if not stop.is_set():
            log.info("%s received: abandoning the current step and leaving", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_worker(options: WorkerOptions) -> WorkerSummary:
    torch.set_num_threads(options.threads)
    check_device(options.device)
    with stop_on_signals(threading.Event()) as stop, \
            connect(options.server, transport_dtype=options.transport_dtype, push_dtype=options.push_dtype,
                    pull_dtype=options.pull_dtype, timeout=options.rpc_timeout,
                    **options.security.client_kwargs()) as client:
        session = Session(client, options.server, retry=options.retry, connect_timeout=options.connect_timeout,
                          stop=stop)
        try:
            return _train(session, options, stop)
        except RetryAborted as aborted:
            log.info("stopped while the server was unreachable (%s); exiting", aborted)
            return WorkerSummary(0, 0, -1)


def _train(session: Session, options: WorkerOptions, stop: threading.Event) -> WorkerSummary:
    config = session.first_contact()
    task_name, task = load_run_task(options.server, config, options.task, options.data_dir)
    model = task.model.to(options.device)
    model.train()
    client = session.client
    info = session.join(ParamLayout.from_module(model), options.device,
                        initial=lambda: (flat_parameters(model), dict(model.named_buffers())))
    log.info("worker %d joined %s (task %s, policy %s, lease %.0fs)", info.worker_id, options.server,
             task_name, config.policy, info.lease_seconds)
    data_seed = config.seed * 1_000_003 + info.worker_id
    data = batches(task.train, options.batch_size or config.batch_size, seed=data_seed)
    augmenting = torch.Generator(device=options.device).manual_seed(data_seed) if task.augment else None
    forward_context = functools.partial(autocast_context, options.device, options.autocast)
    steps = applied = 0
    delays = (options.delay or DelaySpec()).sampler(rank=info.worker_id - 1)
    if options.delay:
        log.info("emulating a straggler: %s, as rank %d (factor %g)", options.delay, delays.rank, delays.factor)
    progress = Progress(options.progress_every)
    # Received parameters and sent gradients live in two tensors reused every step (see pull's out).
    received, gradient = torch.empty(info.layout.numel), torch.empty(info.layout.numel)
    loading = Prefetcher(data, options.prefetch_batches) if options.prefetch_batches else contextlib.nullcontext(data)
    with session.heartbeats(), loading as data:
        version, theta = session.pull(received)
        finished = info.finished
        while not (finished or stop.is_set()):
            load_flat_parameters(model, theta)
            load_buffers(model, client.buffers)
            inputs, targets = (t.to(options.device, non_blocking=True) for t in next(data))
            if augmenting is not None:
                inputs = task.augment(inputs, augmenting)
            model.zero_grad(set_to_none=True)
            with forward_context():
                loss = task.loss(model(inputs), targets)
            loss.backward()
            if stop.is_set():
                break
            grad, loss_value = flat_gradients(model, out=gradient), loss.item()
            result, version, theta = session.push_pull(grad, version, samples=len(targets), loss=loss_value,
                                                       buffers=dict(model.named_buffers()), out=received)
            if result is None:
                continue
            steps += 1
            applied += result.applied
            progress.step(client.info.worker_id, loss_value, result)
            finished = result.finished or session.finished
            if not finished:
                delays.wait(stop)
    worker_id = client.info.worker_id
    session.leave()
    log.info("worker %d done after %d steps, %d pushes applied, %d joins (server version %d)", worker_id,
             steps, applied, session.joins, version)
    return WorkerSummary(worker_id, steps, version, applied, session.joins)


def autocast_context(device: str, dtype: str | None):
    """``torch.autocast`` on ``device``'s type in ``dtype`` (a name), or nothing when ``dtype`` is None.
    Parameters, gradients and what travels keep their dtypes: only the forward pass computes in ``dtype``."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, dtype))
