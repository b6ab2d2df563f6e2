"""``gapaware evaluate``: evaluates a run's parameters where the user's code is, into the server's metrics.

A server that takes its model from a worker (``server --init from-worker``) imports nothing of the
user's and evaluates nothing itself. This process joins it as an observer (it only pulls: the server
keeps no snapshot for it), loads the task, and every ``every`` updates pulls the parameters and buffers,
evaluates them on the task's test split (:func:`gapaware.common.evaluation.evaluate_task`) and reports
the metrics, or the error that stopped them (logged, never fatal), with ``Report``: they become records
of the server's metrics file, Prometheus gauges, TensorBoard scalars and status. Once the run ends it
evaluates the final parameters, reports them and leaves.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import grpc
import torch

from gapaware.common.buffers import load_buffers
from gapaware.common.evaluation import evaluate_task
from gapaware.common.layout import ParamLayout, load_flat_parameters
from gapaware.common.security import ClientSecurity
from gapaware.worker.retry import RetryAborted, RetryPolicy
from gapaware.worker.session import Session, load_run_task
from gapaware.worker.sharded import connect

log = logging.getLogger("gapaware.evaluate")

POLL_SECONDS = 0.5
"""How often the server's version is asked (a Status call, no tensor) between evaluations."""


@dataclass(frozen=True)
class EvaluateOptions:
    server: str
    task: str | None = None           # None: the task the server runs
    data_dir: str | None = None
    device: str = "cpu"
    every: int | None = None          # updates between evaluations; None: the run's eval_every
    threads: int = 1
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    connect_timeout: float = 30.0
    security: ClientSecurity = field(default_factory=ClientSecurity)


def run_evaluator(options: EvaluateOptions, stop: threading.Event | None = None) -> int:
    """Evaluates until the run ends (or ``stop`` is set); returns the evaluations reported."""
    torch.set_num_threads(options.threads)
    stop = stop or threading.Event()
    with connect(options.server, **options.security.client_kwargs()) as client:
        session = Session(client, options.server, retry=options.retry, connect_timeout=options.connect_timeout,
                          stop=stop, observer=True)
        try:
            return _evaluate_run(session, options, stop)
        except RetryAborted as aborted:
            log.info("stopped while the server was unreachable (%s)", aborted)
            return 0


def _evaluate_run(session: Session, options: EvaluateOptions, stop: threading.Event) -> int:
    config = session.first_contact()
    task_name, task = load_run_task(options.server, config, options.task, options.data_dir)
    model = task.model.to(options.device)
    info = session.join(ParamLayout.from_module(model), options.device)
    every = options.every or config.eval_every
    log.info("evaluating task %s for %s every %d updates, as observer %d", task_name, options.server, every,
             info.worker_id)
    received = torch.empty(info.layout.numel)
    reported, evaluated = 0, -1
    with session.heartbeats():
        while not stop.is_set():
            status = session.retry(session.client.status, what="status")
            if status.finished or status.version // every > max(evaluated, 0) // every:
                version, theta = session.pull(received)
                load_flat_parameters(model, theta)
                load_buffers(model, session.client.buffers)
                _report(session, version, *_metrics(task, model, options.device))
                reported, evaluated = reported + 1, version
            if status.finished:
                break
            stop.wait(POLL_SECONDS)
    session.leave()
    log.info("done: %d evaluations reported, the last of version %d", reported, evaluated)
    return reported


def _metrics(task, model, device: str) -> tuple[dict[str, float], str]:
    """The task's metrics of ``model``, or the error that stopped them (logged with its traceback)."""
    try:
        return evaluate_task(task, model, device=device), ""
    except Exception as error:  # the user's model and metrics code: reported, never fatal
        log.exception("evaluation failed; evaluating again at the next interval")
        return {}, f"{type(error).__name__}: {error}"


def _report(session: Session, version: int, metrics: dict[str, float], error: str) -> None:
    try:
        session.report(version, metrics, error)
    except grpc.RpcError as refused:
        log.warning("evaluation of version %d not recorded: %s: %s", version, refused.code().name, refused.details())
        return
    log.info("version %d: %s", version, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()) or error)
