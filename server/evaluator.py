"""Periodic evaluation of the current parameters on the held-out split, off the update path.

A background thread waits for every ``eval_every``-th version, copies the parameters
(the only moment it holds the state's lock) and evaluates the copy while pushes go on.
Each evaluation appends one JSON line to the metrics file: the task's metrics
(:func:`~gapaware.common.evaluation.evaluate_task`), named in its ``eval_metrics``. When
updates outpace evaluation, the versions passed meanwhile are not evaluated; the next record
counts them in ``evals_skipped``. An exception in the evaluation (the user's model or metrics
code) is logged with its traceback and recorded as ``eval_error``; training goes on.

A server without the user's code (``--init from-worker``) evaluates nothing itself: workers and
``gapaware evaluate`` report their evaluations (:meth:`Evaluator.report`, the ``Report`` call), which
become records of the same stream.
"""
from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from gapaware.common.buffers import load_buffers
from gapaware.common.evaluation import evaluate_task
from gapaware.common.layout import load_flat_parameters
from gapaware.common.tasks import Task
from gapaware.server.errors import RequestRefused
from gapaware.server.state import ParameterServerState

log = logging.getLogger("gapaware.server.evaluator")

SKIP_REASON = "updates outpaced evaluation: versions passed during the previous evaluation were not evaluated"


class MetricsLog:
    """Appends one JSON object a line; flushed at once so a crash loses nothing written."""

    def __init__(self, path: Path | None) -> None:
        self._file = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, record: dict) -> None:
        if self._file is None:
            return
        line = json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                           for k, v in record.items()})
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class Evaluator:
    """Evaluates ``task`` on the server, or, with ``task`` None, records the evaluations reported to it."""

    def __init__(self, state: ParameterServerState, task: Task | None, log: MetricsLog, device: str = "cpu") -> None:
        self._state = state
        self._task = task
        self._log = log
        self._device = device
        if task is not None:
            task.model.to(device)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gapaware-evaluator", daemon=True)
        self.last: dict = {"accuracy": math.nan, "loss": math.nan, "version": -1}
        self.errors = 0
        self.skipped = 0
        self.last_reported: dict = {}  # the last evaluation a worker reported

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def evaluate_now(self, event: str = "eval", extra: dict | None = None) -> dict:
        """Evaluates the current parameters and logs the record, with ``extra`` fields (the final
        record carries the run's totals)."""
        if self._evaluates:
            version, metrics, error = self._evaluate()
        else:
            version, metrics, error = self._state.version, {}, None
        return self._record(event, version, metrics, error, extra)

    def report(self, version: int, metrics: Mapping[str, float], error: str = "") -> dict:
        """Records an evaluation made elsewhere, of the parameters of ``version``: ``metrics`` by name, or
        the ``error`` that stopped it. Raises :class:`BadReport` for one the record cannot hold."""
        check_report(version, metrics, error, self._state.version)
        if error:
            self.errors += 1
        self.last_reported = self._record("eval", version, dict(metrics), error or None, {"reported": True})
        return self.last_reported

    @property
    def _evaluates(self) -> bool:
        """Whether this server evaluates: not without the user's code, nor on a slice of the model
        (gapaware export assembles the shards)."""
        return self._task is not None and self._state.shard.count == 1

    def _record(self, event: str, version: int, metrics: dict, error: str | None, extra: dict | None) -> dict:
        record = {
            "event": event,
            "version": version,
            "incarnation": self._state.incarnation,  # restarts from checkpoints: time restarts at 0 with each
            "time": round(time.monotonic() - self._state.started, 3),
            "epoch": round(self._state.epoch(), 4),
            "accuracy": math.nan,
            **metrics,
            "eval_metrics": sorted(metrics),
            "lr": self._state.lr(),
            "workers": len(self._state.live_workers()),
            "eval_errors": self.errors,
            "evals_skipped": self.skipped,
            **self._state.take_window(),
            **(extra or {}),
        }
        if error is not None:
            record["eval_error"] = error
        self.last = record
        self._log.write(record)
        return record

    def _evaluate(self) -> tuple[int, dict[str, float], str | None]:
        version, theta = self._state.parameters()
        try:
            load_flat_parameters(self._task.model, theta)
            load_buffers(self._task.model, self._state.buffer_tensors())
            return version, *self._metrics()
        finally:
            load_flat_parameters(self._task.model, self._state.theta)  # frees the copy: see build_state
            del theta

    def _metrics(self) -> tuple[dict[str, float], str | None]:
        """The task's metrics, or NaN loss and the error that stopped them (logged with its traceback)."""
        try:
            metrics = evaluate_task(self._task, self._task.model, device=self._device)
        except Exception as error:  # the user's model and metrics code: any error, reported, never fatal
            log.exception("evaluation failed; training goes on")
            self.errors += 1
            return {"loss": math.nan}, f"{type(error).__name__}: {error}"
        clashes = sorted(set(metrics) & RECORD_FIELDS)
        if clashes:
            self.errors += 1
            return {"loss": math.nan}, f"the task's metrics use the names {clashes}, which the record uses itself"
        return metrics, None

    def _run(self) -> None:
        every = self._state.config.eval_every
        evaluated = 0
        while self._evaluates and not self._stop.is_set() and not self._state.finished:
            version = self._state.wait_for_version((evaluated // every + 1) * every, timeout=0.5)
            if version // every > evaluated // every and not self._state.finished:
                missed = version // every - evaluated // every - 1  # multiples of every passed unevaluated
                if missed:
                    self.skipped += missed
                    log.info("%d evaluations skipped: %s", missed, SKIP_REASON)
                evaluated = self.evaluate_now(extra={"skip_reason": SKIP_REASON} if missed else None)["version"]


RECORD_FIELDS = frozenset({"event", "version", "time", "epoch", "eval_metrics", "lr", "workers", "eval_errors",
                           "evals_skipped", "eval_error", "skip_reason", "staleness_counts", "pushes",
                           "mean_staleness", "mean_gap", "train_loss", "held_snapshots",
                           "run_mean_staleness", "run_mean_gap", "run_train_loss", "incarnation", "reported"})
"""Names an evaluation record uses for itself, which a task's metrics may not take."""

MAX_REPORTED_METRICS = 64
MAX_ERROR_CHARS = 4096
METRIC_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_./-]{0,63}$")


class BadReport(RequestRefused):
    """A reported evaluation the metrics stream cannot hold: the message says what to change."""


def check_report(version: int, metrics: Mapping[str, float], error: str, current_version: int) -> None:
    """Refuses a report of a version the server has not reached, more than :data:`MAX_REPORTED_METRICS`
    metrics, names that are not plain identifiers (up to 64 characters) or that the record uses itself,
    and an error message longer than :data:`MAX_ERROR_CHARS`."""
    if version > current_version:
        raise BadReport(f"the report is of version {version}; the server is at {current_version}")
    if len(metrics) > MAX_REPORTED_METRICS:
        raise BadReport(f"the report holds {len(metrics)} metrics; at most {MAX_REPORTED_METRICS} are recorded")
    bad = sorted(name for name in metrics if not METRIC_NAME.match(name))
    if bad:
        raise BadReport(f"metric names {bad[:5]} are not plain names (a letter or _, then letters, digits, _ . / -; "
                        "at most 64 characters)")
    clashes = sorted(set(metrics) & RECORD_FIELDS)
    if clashes:
        raise BadReport(f"the metrics use the names {clashes}, which the record uses itself")
    if len(error) > MAX_ERROR_CHARS:
        raise BadReport(f"the error message has {len(error)} characters; at most {MAX_ERROR_CHARS}")


def describe_metrics(record: dict) -> str:
    """An evaluation record's metrics as one line: ``accuracy 0.9512, loss 0.1834``, and its error."""
    text = ", ".join(f"{name} {record[name]:.4g}" for name in record.get("eval_metrics", ()))
    return text + (f"; evaluation failed: {record['eval_error']}" if "eval_error" in record else "")
