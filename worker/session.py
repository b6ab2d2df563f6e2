"""A worker's place in a run, for every kind of worker: the training loop (:mod:`gapaware.worker.loop`),
:class:`gapaware.RemoteOptimizer` and ``gapaware evaluate``.

:class:`Session` wraps a client (:func:`gapaware.worker.sharded.connect`) in what preemptible clusters
need: every call retried with backoff (:mod:`gapaware.worker.retry`), a retried push keeping its sequence
number; a first contact that gives up after ``connect_timeout`` (a wrong address fails fast); joining
again, and pulling afresh, whenever the server forgot this worker (its lease expired, or it restarted
from a checkpoint): the gradient computed on the forgotten snapshot is dropped; a heartbeat thread that
keeps the lease alive while a step computes; and one Leave at the end, not retried.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import threading

import grpc
import torch

from gapaware.common.config import RunConfig
from gapaware.common.layout import ParamLayout
from gapaware.common.registry import FROM_WORKER
from gapaware.common.results import PushResult
from gapaware.common.tasks import Task, TaskError, load_task
from gapaware.worker.client import InitialModel, JoinInfo
from gapaware.worker.heartbeat import Heartbeat
from gapaware.worker.retry import RetryPolicy, call_with_retries, is_retryable

log = logging.getLogger("gapaware.worker")

MAX_REJOINS_IN_A_ROW = 10
"""Re-joins without a single push in between before the worker gives up (something is wrong
beyond a restart: e.g. a lease shorter than one step)."""


class ServerUnreachable(RuntimeError):
    """The server did not answer for as long as the worker waits: before the first contact
    ``connect_timeout``, later the retry policy's ``give_up_after``. The message says what to check."""


def load_run_task(server: str, config: RunConfig, task: str | None, data_dir: str | None) -> tuple[str, Task]:
    """The name and the task this process loads for the run ``server`` runs: ``task``, else the run's (its
    seed and data directory too). A server that takes its model from the workers names none: then
    ``task`` must be given."""
    name = task or config.task
    if name == FROM_WORKER:
        raise TaskError("the server takes its model from the workers (--init from-worker) and names no task: "
                        "give --task, the task whose model is trained (a worker's is sent if it joins first)")
    log.info("the server at %s runs task %s (policy %s): loading %s", server, config.task, config.policy,
             "it" if name == config.task else f"task {name}")
    return name, load_task(name, seed=config.seed, data_dir=data_dir or config.data_dir)


class Session:
    """One worker's membership of the run ``client`` connects to (at ``server``, for messages).

    ``stop`` ends a retry's wait early (SIGTERM); ``observer`` joins only to pull and evaluate. Use
    :meth:`first_contact`, then :meth:`join` with the model's layout (and ``initial``, for a server that
    takes its model from a worker), then :meth:`pull` and :meth:`push_pull`, inside :meth:`heartbeats`;
    :meth:`leave` at the end. Calls that still fail once the retry policy gives up raise
    :class:`ServerUnreachable`; refusals raise the ``grpc.RpcError``.
    """

    def __init__(self, client, server: str, *, retry: RetryPolicy = RetryPolicy(), connect_timeout: float = 30.0,
                 stop: threading.Event | None = None, observer: bool = False) -> None:
        self.client = client
        self._server = server
        self._policy = retry
        self._connect_timeout = connect_timeout
        self._stop = stop or threading.Event()
        self._observer = observer
        self._join_args: tuple[ParamLayout | None, str, InitialModel | None] = (None, "cpu", None)
        self.joins = 0
        self._rejoins_since_push = 0
        self._heartbeat: Heartbeat | None = None

    def retry(self, call, *, what: str, policy: RetryPolicy | None = None):
        """``call()`` with retries (:func:`call_with_retries`); a failure the retries did not overcome
        becomes :class:`ServerUnreachable`."""
        policy = policy or self._policy
        try:
            return call_with_retries(call, policy=policy, stop=self._stop, answers=self.client.answers, what=what)
        except grpc.RpcError as error:
            if not is_retryable(error):
                raise
            raise ServerUnreachable(
                f"lost the server at {self._server}: no answer to {what} for --retry-give-up-after "
                f"{policy.give_up_after:g}s "
                f"({error.code().name}: {error.details()})") from error

    def first_contact(self) -> RunConfig:
        """The run's config, from the server's Status: the first call, retried for ``connect_timeout``
        seconds at most (a wrong address or port fails fast; a server still starting is waited for)."""
        log.info("connecting to %s", self._server)
        policy = self._policy
        if self._connect_timeout:
            policy = dataclasses.replace(policy, give_up_after=min(policy.give_up_after, self._connect_timeout))
        try:
            reply = call_with_retries(self.client.status, policy=policy, stop=self._stop, answers=self.client.answers,
                                      what="status")
        except grpc.RpcError as error:
            if not is_retryable(error):
                raise
            raise ServerUnreachable(
                f"no answer from the server at {self._server} for {policy.give_up_after:g}s "
                f"({error.code().name}: {error.details()}): is it running, and is --server its HOST:PORT? "
                "(--connect-timeout waits longer for a server still starting)") from error
        return RunConfig.from_json(reply.run_config_json)

    def join(self, layout: ParamLayout | None, device: str = "cpu", initial: InitialModel | None = None) -> JoinInfo:
        """Joins with the model's ``layout`` (``initial``: its parameters and buffers, which a server that
        takes its model from a worker may ask for); later calls join again with the same."""
        self._join_args = (layout, device, initial)
        return self._join()

    def _join(self) -> JoinInfo:
        if self._rejoins_since_push >= MAX_REJOINS_IN_A_ROW:
            raise RuntimeError(f"the server forgot this worker {MAX_REJOINS_IN_A_ROW} times without a push "
                               "in between: is --lease-seconds shorter than a step?")
        layout, device, initial = self._join_args
        join = functools.partial(self.client.join, layout, device=device, initial=initial)
        if self._observer:
            join = functools.partial(join, observer=True)
        info = self.retry(join, what="join")
        self.joins += 1
        if self.joins > 1:
            self._rejoins_since_push += 1
            log.info("joined again as worker %d (server version %d)", info.worker_id, info.version)
        return info

    def pull(self, out: torch.Tensor | None = None) -> tuple[int, torch.Tensor]:
        """The current parameters (in ``out``), joining again first as often as the server does not know us."""
        while True:
            try:
                return self.retry(lambda: self.client.pull(out=out), what="pull")
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                log.warning("the server forgot this worker (%s): joining again", error.details())
                self._join()

    def push_pull(self, grad: torch.Tensor, version: int, *, out: torch.Tensor | None = None,
                  **details) -> tuple[PushResult | None, int, torch.Tensor]:
        """Pushes ``grad`` (computed on ``version``) and receives the parameters after it, as
        :meth:`WorkerClient.push_pull` (``details``: samples, loss, buffers). A push the server refuses
        because it forgot this worker or the snapshot is gone (``NOT_FOUND``, ``FAILED_PRECONDITION``) is
        dropped: the result is None and the parameters are pulled afresh."""
        seq = self.client.next_seq()
        try:
            result, version, theta = self.retry(
                lambda: self.client.push_pull(grad, version, seq=seq, out=out, **details), what=f"push {seq}")
        except grpc.RpcError as error:
            if error.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
                raise
            log.warning("push %d refused (%s: %s): dropping its gradient, pulling afresh", seq,
                        error.code().name, error.details())
            return None, *self.pull(out)
        self._rejoins_since_push = 0
        return result, version, theta

    def report(self, version: int, metrics: dict[str, float], error: str = "") -> None:
        """Reports an evaluation into the server's metrics stream; a server that forgot us gets it after a re-join."""
        try:
            self.retry(lambda: self.client.report(version, metrics, error), what="report")
        except grpc.RpcError as refused:
            if refused.code() != grpc.StatusCode.NOT_FOUND:
                raise
            self._join()
            self.retry(lambda: self.client.report(version, metrics, error), what="report")

    def heartbeats(self) -> Heartbeat:
        """A heartbeat thread for this membership, every third of the lease (a context manager); its
        ``finished`` turns True once the server says the run is over."""
        self._heartbeat = Heartbeat(self.client, interval=self.client.info.lease_seconds / 3)
        return self._heartbeat

    @property
    def finished(self) -> bool:
        """Whether a heartbeat heard that the run is over."""
        return self._heartbeat is not None and self._heartbeat.finished

    def leave(self) -> None:
        """Leave once, without retrying: a server that is gone or forgot us has nothing to free."""
        try:
            self.client.leave()
        except grpc.RpcError as error:
            log.info("leave not acknowledged (%s: %s); the server's lease frees this worker", error.code().name,
                     error.details())
