"""Writes checkpoints while the run goes on: every N updates and every S seconds, off the update path.

A background thread waits for the version (or the clock) to come due, takes a copy of the state
under its lock (:meth:`ParameterServerState.checkpoint`, the only moment pushes wait) and
writes the copy to disk while pushes go on.

A write that fails (a full disk, a read-only directory) does not stop the run or the checkpointer:
it is counted in the state's :class:`~gapaware.server.checkpoint.CheckpointHealth` (status and
metrics), logged once for each reason until a write succeeds again, and the next write comes at the
schedule as usual, so checkpoints resume by themselves once the disk has room again.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from gapaware.server.checkpoint import CheckpointDirectory, CheckpointWriteError
from gapaware.server.state import ParameterServerState

log = logging.getLogger("gapaware.server.checkpoint")


@dataclass(frozen=True)
class CheckpointOptions:
    directory: Path
    every_updates: int = 0        # 0: not by update count
    every_seconds: float = 0.0    # 0: not by time
    keep: int = 3

    def __post_init__(self) -> None:
        if self.every_updates < 0:
            raise ValueError(f"Invalid checkpoint interval: {self.every_updates} updates")
        if self.every_seconds < 0:
            raise ValueError(f"Invalid checkpoint interval: {self.every_seconds} seconds")
        if self.keep < 1:
            raise ValueError(f"Invalid number of checkpoints to keep: {self.keep} (at least 1)")


class Checkpointer:
    def __init__(self, state: ParameterServerState, options: CheckpointOptions) -> None:
        self._state = state
        self._options = options
        self.directory = CheckpointDirectory(options.directory, options.keep)
        self._write_lock = threading.Lock()
        self._logged_reasons: set[str] = set()   # of the failures since the last write that succeeded
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gapaware-checkpointer", daemon=True)

    def save(self, reason: str) -> Path:
        """Writes a checkpoint of the state now; ``reason`` goes into the log line. A failed write is
        counted and logged (once per reason), then raised as :class:`CheckpointWriteError`."""
        health = self._state.checkpoint_health
        with self._write_lock:
            checkpoint = self._state.checkpoint()
            started = time.monotonic()
            try:
                path = self.directory.save(checkpoint)
            except CheckpointWriteError as error:
                health.failures += 1
                health.last_error = str(error)
                if error.reason not in self._logged_reasons:
                    self._logged_reasons.add(error.reason)
                    log.error("%s (%s)%s", error, reason, "; the run goes on and checkpoints are retried at their "
                              "schedule; further failures for this reason are counted in status and metrics, not "
                              "logged" if self._thread.is_alive() else "")
                raise
            health.version = checkpoint.version
            resumed = bool(self._logged_reasons)
            self._logged_reasons.clear()
        log.info("checkpoint (%s) at version %d written to %s in %.2fs%s", reason, checkpoint.version, path,
                 time.monotonic() - started,
                 f"; checkpoints resume after {health.failures} failed writes so far" if resumed else "")
        return path

    def start(self) -> None:
        if self._options.every_updates or self._options.every_seconds:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        every, seconds = self._options.every_updates, self._options.every_seconds
        next_version = self._state.version + every if every else math.inf
        next_time = time.monotonic() + seconds if seconds else math.inf
        saved_version = self._state.version
        while not self._stop.is_set() and not self._state.finished:
            wait = min(0.5, max(0.0, next_time - time.monotonic()))
            version = self._state.wait_for_version(next_version, timeout=wait)
            if self._stop.is_set() or self._state.finished:
                return
            if version < next_version and time.monotonic() < next_time:
                continue
            if version != saved_version:
                try:
                    self.save("every %d updates" % every if version >= next_version else "every %gs" % seconds)
                    saved_version = version
                except CheckpointWriteError:
                    pass  # counted and logged by save; the next interval retries
            next_version = version + every if every else math.inf
            next_time = time.monotonic() + seconds if seconds else math.inf
