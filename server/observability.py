"""What a running server tells the outside: Prometheus metrics and TensorBoard scalars.

:class:`ServerMetrics` owns the Prometheus metrics of one server in a registry of its own.
The servicer reports each push (``push_answered``, ``push_rejected``) and the bytes it
sends; the evaluator's records arrive through ``write`` like every other record sink;
version, live workers and whether the run finished are read from the state only when
scraped. Every call on the update path is a counter or histogram increment, a few
microseconds against the milliseconds a push takes.

:class:`TensorBoardLog` writes the evaluator's records as TensorBoard scalars, and
:class:`RecordSinks` hands one record to several sinks (the JSON-lines file, TensorBoard,
the metrics).
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from gapaware.common.results import PushResult
from gapaware.server.metrics_http import serve_metrics
from gapaware.server.state import ParameterServerState

STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256)
GAP_BUCKETS = (1.0, 1.05, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Numbers of an evaluation record that become TensorBoard scalars (and the tag each gets).
SCALARS = {
    "accuracy": "eval/accuracy", "loss": "eval/loss", "train_loss": "train/loss", "lr": "train/lr",
    "mean_staleness": "push/mean_staleness", "mean_gap": "push/mean_gap", "workers": "run/workers",
    "epoch": "run/epoch", "eval_errors": "eval/errors", "evals_skipped": "eval/skipped",
}


class RecordSink(Protocol):
    def write(self, record: dict) -> None: ...

    def close(self) -> None: ...


def rejection_reason(error: Exception) -> str:
    """The ``reason`` label of a refused push: the error class in snake case (``StaleSnapshot`` -> ``stale_snapshot``)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(error).__name__).lower()


class ServerMetrics:
    """The Prometheus metrics of one server; ``serve(host, port)`` exposes them at ``/metrics``."""

    def __init__(self, state: ParameterServerState) -> None:
        self.registry = CollectorRegistry()
        self._http = None
        reg = self.registry
        Info("gapaware_run", "The run's task and policy.", registry=reg).info(
            {"task": state.config.task, "policy": state.config.policy})
        Gauge("gapaware_updates", "Updates applied to the model (its version).",
              registry=reg).set_function(lambda: state.version)
        Gauge("gapaware_max_updates", "The update at which the run ends.",
              registry=reg).set_function(lambda: state.total_updates)
        Gauge("gapaware_live_workers", "Workers registered now.",
              registry=reg).set_function(lambda: len(state.live_workers()))
        Gauge("gapaware_run_finished", "1 once the run has ended.",
              registry=reg).set_function(lambda: float(state.finished))
        Gauge("gapaware_grad_norm_limit", "The largest gradient norm a push may have now (NaN: no bound).",
              registry=reg).set_function(state.grad_norm_limit)
        reg.register(_StateCounters(state))
        self._accepted = Counter("gapaware_pushes_accepted", "Pushes applied as an update.", registry=reg)
        self._rejected = Counter("gapaware_pushes_rejected", "Pushes refused or not applied, by reason.",
                                 ["reason"], registry=reg)
        self._staleness = Histogram("gapaware_push_staleness", "Staleness (updates since the pull) of applied pushes.",
                                    buckets=STALENESS_BUCKETS, registry=reg)
        self._gap = Histogram("gapaware_push_gap", "Mean per-element Gap of applied pushes (1 without Gap-Aware).",
                              buckets=GAP_BUCKETS, registry=reg)
        self._latency = Histogram("gapaware_update_latency_seconds",
                                  "From a push's first frame to its update applied (receive, check, apply).",
                                  buckets=LATENCY_BUCKETS, registry=reg)
        self._bytes_in = Counter("gapaware_received_bytes", "Tensor payload bytes received (gradients).", registry=reg)
        self._bytes_out = Counter("gapaware_sent_bytes", "Tensor payload bytes sent (parameters).", registry=reg)
        self._sends_ended = Counter("gapaware_sends_ended",
                                    "Replies cut off because the client did not take them by their deadline.",
                                    registry=reg)
        self._accuracy = Gauge("gapaware_eval_accuracy", "Held-out accuracy of the last evaluation.", registry=reg)
        self._loss = Gauge("gapaware_eval_loss", "Held-out loss of the last evaluation.", registry=reg)
        self._eval_version = Gauge("gapaware_eval_version", "Version the last evaluation measured.", registry=reg)
        self._eval_metric = Gauge("gapaware_eval_metric", "Each metric of the last evaluation (the task's own too), "
                                  "by name.", ["name"], registry=reg)
        self._eval_errors = Gauge("gapaware_eval_errors", "Evaluations that failed with an error (logged with "
                                  "its traceback).", registry=reg)
        self._evals_skipped = Gauge("gapaware_evals_skipped", "Evaluations skipped because updates outpaced "
                                    "evaluation.", registry=reg)
        for gauge in (self._accuracy, self._loss):
            gauge.set(math.nan)

    # -- called by the servicer, on the update path --------------------------------------------
    def push_answered(self, result: PushResult, seconds: float, received_bytes: int) -> None:
        """A push the state answered: applied, or (``result.applied`` false) arrived after the end."""
        self._bytes_in.inc(received_bytes)
        if not result.applied:
            self._rejected.labels("run_finished").inc()
            return
        self._accepted.inc()
        self._staleness.observe(result.staleness)
        self._gap.observe(result.mean_gap)
        self._latency.observe(seconds)

    def push_rejected(self, reason: str, received_bytes: int = 0) -> None:
        self._bytes_in.inc(received_bytes)
        self._rejected.labels(reason).inc()

    def sent(self, nbytes: int) -> None:
        self._bytes_out.inc(nbytes)

    def send_ended(self) -> None:
        self._sends_ended.inc()

    # -- a record sink, fed by the evaluator ---------------------------------------------------
    def write(self, record: dict) -> None:
        self._accuracy.set(_number(record.get("accuracy")))
        self._loss.set(_number(record.get("loss")))
        self._eval_version.set(record.get("version", -1))
        for name in record.get("eval_metrics", ()):
            self._eval_metric.labels(name).set(_number(record.get(name)))
        self._eval_errors.set(record.get("eval_errors", 0))
        self._evals_skipped.set(record.get("evals_skipped", 0))

    # -- exposition ----------------------------------------------------------------------------
    async def serve(self, host: str, port: int) -> None:
        """Serves ``/metrics`` over HTTP on ``host:port`` from the running event loop
        (:mod:`gapaware.server.metrics_http`)."""
        try:
            self._http = await serve_metrics(self.registry, host, port)
        except OSError as error:
            raise OSError(f"could not serve metrics on {host}:{port} (--metrics-port): "
                          f"{error.strerror or error}") from None

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None


class TensorBoardLog:
    """Writes each evaluation record as TensorBoard scalars at step = the record's version."""

    def __init__(self, log_dir: Path) -> None:
        writer_class = tensorboard_writer_class()
        self._writer = writer_class(log_dir=str(log_dir))

    def write(self, record: dict) -> None:
        step = int(record["version"])
        tags = {**SCALARS, **{name: f"eval/{name}" for name in record.get("eval_metrics", ())}}
        for key, tag in tags.items():
            value = _number(record.get(key))
            if math.isfinite(value):
                self._writer.add_scalar(tag, value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def tensorboard_writer_class():
    """torch's ``SummaryWriter``; a clear error when the optional ``tensorboard`` package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise RuntimeError("--tensorboard needs the tensorboard package: pip install 'gapaware[tensorboard]' "
                           f"(or pip install tensorboard); import failed with: {error}") from None
    return SummaryWriter


class RecordSinks:
    """Hands every record to each sink, in order."""

    def __init__(self, sinks: Iterable[RecordSink]) -> None:
        self._sinks = list(sinks)

    def write(self, record: dict) -> None:
        for sink in self._sinks:
            sink.write(record)

    def close(self) -> None:
        for sink in self._sinks:
            sink.close()


class _StateCounters:
    """Counters the state keeps (reported when scraped): undone updates and checkpoint writes."""

    def __init__(self, state: ParameterServerState) -> None:
        self._state = state

    def collect(self):
        health = self._state.checkpoint_health
        yield CounterMetricFamily("gapaware_nonfinite_updates", "Updates undone because they left NaN or Inf in "
                                  "the parameters.", value=self._state.updater.nonfinite_updates)
        yield CounterMetricFamily("gapaware_checkpoint_failures", "Checkpoint writes that failed (full disk, "
                                  "read-only directory); the run goes on.", value=health.failures)
        yield GaugeMetricFamily("gapaware_checkpoint_version", "Version of the newest checkpoint written (-1: none).",
                                value=health.version)


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan
