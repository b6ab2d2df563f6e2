"""Periodic evaluation of the current parameters on the held-out split, off the update path.

A background thread waits for every ``eval_every``-th version, copies the parameters
(the only moment it holds the state's lock) and evaluates the copy while pushes go on.
Each evaluation appends one JSON line to the metrics file.
"""
from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

from gapaware.common.evaluation import evaluate
from gapaware.common.layout import load_flat_parameters
from gapaware.common.tasks import Task
from gapaware.server.state import ParameterServerState


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
    def __init__(self, state: ParameterServerState, task: Task, log: MetricsLog, device: str = "cpu") -> None:
        self._state = state
        self._task = task
        self._log = log
        self._device = device
        self._task.model.to(device)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gapaware-evaluator", daemon=True)
        self.last: dict = {"accuracy": math.nan, "loss": math.nan, "version": -1}

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def evaluate_now(self, event: str = "eval", extra: dict | None = None) -> dict:
        """Evaluates the current parameters and logs the record, with ``extra`` fields (the final
        record carries the run's totals)."""
        version, theta = self._state.parameters()
        load_flat_parameters(self._task.model, theta)
        loss, accuracy = evaluate(self._task.model, self._task.loss, self._task.test, device=self._device)
        load_flat_parameters(self._task.model, self._state.theta)  # frees the copy: see build_state
        del theta
        record = {
            "event": event,
            "version": version,
            "incarnation": self._state.incarnation,  # restarts from checkpoints: time restarts at 0 with each
            "time": round(time.monotonic() - self._state.started, 3),
            "epoch": round(self._state.epoch(), 4),
            "loss": loss,
            "accuracy": accuracy,
            "lr": self._state.lr(),
            "workers": len(self._state.live_workers()),
            **self._state.take_window(),
            **(extra or {}),
        }
        self.last = record
        self._log.write(record)
        return record

    def _run(self) -> None:
        every = self._state.config.eval_every
        next_version = every
        while not self._stop.is_set() and not self._state.finished:
            version = self._state.wait_for_version(next_version, timeout=0.5)
            if version >= next_version and not self._state.finished:
                self.evaluate_now()
                next_version = (version // every + 1) * every
