"""The worker's training loop: pull → forward/backward on a batch → push, until the run ends.

Built on :class:`~gapaware.worker.client.WorkerClient`; one round trip a step (the
push returns the parameters the update produced). The loop survives what preemptible
clusters do to it:

* the server restarting or the network failing: every call is retried with backoff
  (:mod:`gapaware.worker.retry`); a retried push keeps its sequence number, so it counts once.
  Before the server first answered, the retries end after ``connect_timeout`` seconds instead
  (:class:`ServerUnreachable`): a wrong address fails fast rather than for the whole retry limit;
* the server forgetting this worker (its lease expired, or the server restarted from a
  checkpoint): the push is refused with ``NOT_FOUND``, the worker joins again, pulls fresh
  parameters and carries on (the gradient computed on the forgotten snapshot is dropped);
* SIGTERM or SIGINT: the step in progress is abandoned, the worker leaves and exits 0.

A heartbeat thread keeps the lease alive while a step computes, and a prefetch thread loads the
next batches while the step computes and its round trip is in flight (:mod:`gapaware.worker.prefetch`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import signal
import threading
from dataclasses import dataclass, field

import grpc
import torch

from gapaware.common.config import RunConfig
from gapaware.common.data import batches
from gapaware.common.buffers import load_buffers
from gapaware.common.devices import check_device
from gapaware.common.layout import ParamLayout, flat_gradients, load_flat_parameters
from gapaware.common.registry import DEFAULTS
from gapaware.common.security import ClientSecurity
from gapaware.common.tasks import load_task
from gapaware.worker.client import WorkerClient
from gapaware.worker.delay import DelaySpec
from gapaware.worker.heartbeat import Heartbeat
from gapaware.worker.prefetch import Prefetcher
from gapaware.worker.sharded import connect
from gapaware.worker.progress import Progress
from gapaware.worker.retry import RetryAborted, RetryPolicy, call_with_retries, is_retryable

log = logging.getLogger("gapaware.worker")

MAX_REJOINS_IN_A_ROW = 10
"""Re-joins without a single push in between before the worker gives up (something is wrong
beyond a restart: e.g. a lease shorter than one step)."""


class ServerUnreachable(RuntimeError):
    """The server did not answer for as long as the worker waits: before the first contact
    ``connect_timeout``, later the retry policy's ``give_up_after``. The message says what to check."""


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


class _Registration:
    """This worker's place in the run: joins, and joins again whenever the server forgot it."""

    def __init__(self, client: WorkerClient, layout: ParamLayout, device: str, retry) -> None:
        self._client = client
        self._layout = layout
        self._device = device
        self._retry = retry
        self.joins = 0
        self._rejoins_since_push = 0

    def join(self):
        if self._rejoins_since_push >= MAX_REJOINS_IN_A_ROW:
            raise RuntimeError(f"the server forgot this worker {MAX_REJOINS_IN_A_ROW} times without a push "
                               "in between: is --lease-seconds shorter than a step?")
        info = self._retry(lambda: self._client.join(self._layout, device=self._device), what="join")
        self.joins += 1
        if self.joins > 1:
            self._rejoins_since_push += 1
            log.info("joined again as worker %d (server version %d)", info.worker_id, info.version)
        return info

    def pushed(self) -> None:
        self._rejoins_since_push = 0

    def pull(self, out: torch.Tensor) -> tuple[int, torch.Tensor]:
        """The current parameters (in ``out``), joining again first as often as the server does not know us."""
        while True:
            try:
                return self._retry(lambda: self._client.pull(out=out), what="pull")
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                log.warning("the server forgot this worker (%s): joining again", error.details())
                self.join()


def run_worker(options: WorkerOptions) -> WorkerSummary:
    torch.set_num_threads(options.threads)
    check_device(options.device)
    with stop_on_signals(threading.Event()) as stop, \
            connect(options.server, transport_dtype=options.transport_dtype, push_dtype=options.push_dtype,
                    pull_dtype=options.pull_dtype, timeout=options.rpc_timeout,
                    **options.security.client_kwargs()) as client:
        retry = functools.partial(call_with_retries, policy=options.retry, stop=stop, answers=client.answers)
        try:
            return _train(client, options, retry, stop)
        except RetryAborted as aborted:
            log.info("stopped while the server was unreachable (%s); exiting", aborted)
            return WorkerSummary(0, 0, -1)
        except grpc.RpcError as error:
            if not is_retryable(error):
                raise
            raise ServerUnreachable(
                f"lost the server at {options.server}: no answer for --retry-give-up-after "
                f"{options.retry.give_up_after:g}s ({error.code().name}: {error.details()})") from error


def _first_contact(client: WorkerClient, options: WorkerOptions, retry) -> RunConfig:
    """The run's config, from the server's Status: the first call, retried for ``connect_timeout``
    seconds at most (a wrong address or port fails fast; a server still starting is waited for)."""
    log.info("connecting to %s", options.server)
    policy = options.retry
    if options.connect_timeout:
        policy = dataclasses.replace(policy, give_up_after=min(policy.give_up_after, options.connect_timeout))
    try:
        reply = retry(client.status, what="status", policy=policy)
    except grpc.RpcError as error:
        if not is_retryable(error):
            raise
        raise ServerUnreachable(
            f"no answer from the server at {options.server} for {policy.give_up_after:g}s "
            f"({error.code().name}: {error.details()}): is it running, and is --server its HOST:PORT? "
            "(--connect-timeout waits longer for a server still starting)") from error
    return RunConfig.from_json(reply.run_config_json)


def _train(client: WorkerClient, options: WorkerOptions, retry, stop: threading.Event) -> WorkerSummary:
    config = _first_contact(client, options, retry)
    task_name = options.task or config.task
    log.info("the server at %s runs task %s (policy %s): loading %s", options.server, config.task, config.policy,
             "it" if task_name == config.task else f"task {task_name}")
    task = load_task(task_name, seed=config.seed, data_dir=options.data_dir or config.data_dir)
    model = task.model.to(options.device)
    model.train()
    registration = _Registration(client, ParamLayout.from_module(model), options.device, retry)
    info = registration.join()
    log.info("worker %d joined %s (task %s, policy %s, lease %.0fs)", info.worker_id, options.server,
             config.task, config.policy, info.lease_seconds)
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
    with Heartbeat(client, interval=info.lease_seconds / 3) as heartbeat, loading as data:
        version, theta = registration.pull(received)
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
            grad, seq, loss_value = flat_gradients(model, out=gradient), client.next_seq(), loss.item()
            try:
                result, version, theta = retry(
                    lambda: client.push_pull(grad, version, samples=len(targets), loss=loss_value, seq=seq,
                                             buffers=dict(model.named_buffers()), out=received),
                    what=f"push {seq}")
            except grpc.RpcError as error:
                if error.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
                    raise
                log.warning("push %d refused (%s: %s): dropping its gradient, pulling afresh", seq,
                            error.code().name, error.details())
                version, theta = registration.pull(received)
                continue
            registration.pushed()
            steps += 1
            applied += result.applied
            progress.step(client.info.worker_id, loss_value, result)
            finished = result.finished or heartbeat.finished
            if not finished:
                delays.wait(stop)
    worker_id = client.info.worker_id
    _leave(client)
    log.info("worker %d done after %d steps, %d pushes applied, %d joins (server version %d)", worker_id,
             steps, applied, registration.joins, version)
    return WorkerSummary(worker_id, steps, version, applied, registration.joins)


def autocast_context(device: str, dtype: str | None):
    """``torch.autocast`` on ``device``'s type in ``dtype`` (a name), or nothing when ``dtype`` is None.
    Parameters, gradients and what travels keep their dtypes: only the forward pass computes in ``dtype``."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, dtype))


def _leave(client: WorkerClient) -> None:
    """Leave once, without retrying: a server that is gone or forgot us has nothing to free."""
    try:
        client.leave()
    except grpc.RpcError as error:
        log.info("leave not acknowledged (%s: %s); the server's lease frees this worker", error.code().name,
                 error.details())
