"""The worker's progress line, every few seconds between ``joined`` and ``done``: how fast it steps,
the loss it sees, and the staleness and Gap the server reports for its pushes."""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

from gapaware.common.results import PushResult

log = logging.getLogger("gapaware.worker")


class Progress:
    """Logs one line every ``every`` seconds (0: never) about the steps since the previous line.

    The loss is the mean of the losses this worker computed; staleness and Gap are the means of the
    pushes the server applied (a retried copy it had applied already is not counted twice).
    """

    def __init__(self, every: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._every = every
        self._clock = clock
        self._start()

    def _start(self) -> None:
        self._since = self._clock()
        self._steps = self._applied = 0
        self._loss = self._staleness = self._gap = 0.0
        self._losses = 0

    def step(self, worker_id: int, loss: float, result: PushResult) -> None:
        """Counts one step; logs the line when it is due."""
        if not self._every:
            return
        self._steps += 1
        if math.isfinite(loss):
            self._loss += loss
            self._losses += 1
        if result.applied:
            self._applied += 1
            self._staleness += result.staleness
            self._gap += result.mean_gap
        elapsed = self._clock() - self._since
        if elapsed >= self._every:
            log.info("worker %d: %.1f steps/s, loss %s, staleness %s, Gap %s over the last %.0fs; server version %d",
                     worker_id, self._steps / elapsed, _mean(self._loss, self._losses, ".4g"),
                     _mean(self._staleness, self._applied), _mean(self._gap, self._applied, ".3f"), elapsed,
                     result.version)
            self._start()


def _mean(total: float, count: int, spec: str = ".2f") -> str:
    return format(total / count, spec) if count else "-"
