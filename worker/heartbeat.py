"""Keeps a worker's lease alive while it computes: a heartbeat every third of the lease."""
from __future__ import annotations

import logging
import threading

import grpc

from gapaware.worker.client import WorkerClient

log = logging.getLogger("gapaware.worker")


class Heartbeat:
    """A background thread calling :meth:`WorkerClient.heartbeat` every ``interval`` seconds.

    Failures are only logged: a worker the server forgot finds out at its next push, which
    re-joins. ``finished`` turns True once the server says the run is over.
    """

    def __init__(self, client: WorkerClient, interval: float) -> None:
        self._client = client
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gapaware-heartbeat", daemon=True)
        self.finished = False

    def __enter__(self) -> Heartbeat:
        if self._interval > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.finished = self._client.heartbeat(timeout=self._interval) or self.finished
            except grpc.RpcError as error:
                log.debug("heartbeat failed: %s %s", error.code().name, error.details())
            except RuntimeError:  # between a lost membership and the re-join: nothing to renew
                pass
