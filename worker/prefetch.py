"""Loading the next batches in a background thread while the worker computes and talks to the server.

Without it a worker step is strictly serial: load a batch, forward and backward, one round trip
to the server, and only then the next batch. A task whose ``Dataset`` decodes or augments in
``__getitem__`` (anything but a ``TensorDataset`` goes through a ``DataLoader`` in the calling
thread) then pays its loading time on every step on top of the network's. :class:`Prefetcher`
takes the batches from their iterator in a thread of its own, up to ``depth`` ahead, so the
loading overlaps the round trip (the gRPC call waits without the GIL) and the model's compute
(torch releases it too). The batches and their order are exactly the iterator's.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

_POLL_SECONDS = 0.1


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_EXHAUSTED = object()


class Prefetcher(Generic[T]):
    """An iterator over ``source``'s items, taken from ``source`` in a thread up to ``depth`` ahead.

    An exception raised by ``source`` is raised by ``next`` once the items before it are taken.
    :meth:`close` (or leaving the ``with`` block) stops the thread: ``source`` is not advanced
    further than ``depth`` items past the last one taken, plus one being loaded at that moment,
    which close waits up to ``close_wait`` seconds for (the thread is a daemon: a loader stuck
    on a dead file system does not keep a preempted worker from exiting).
    """

    def __init__(self, source: Iterator[T], depth: int = 2, close_wait: float = 5.0) -> None:
        if depth < 1:
            raise ValueError(f"Invalid prefetch depth: {depth} (at least 1)")
        self._source = source
        self._ready: queue.Queue = queue.Queue(maxsize=depth)
        self._closed = threading.Event()
        self._done = False
        self._close_wait = close_wait
        self._thread = threading.Thread(target=self._fill, name="gapaware-prefetch", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        while not self._closed.is_set():
            try:
                item = next(self._source)
            except StopIteration:
                item = _EXHAUSTED
            except BaseException as error:  # handed to the consumer, who decides
                item = _Failed(error)
            while not self._closed.is_set():
                try:
                    self._ready.put(item, timeout=_POLL_SECONDS)
                    break
                except queue.Full:
                    continue
            if item is _EXHAUSTED or isinstance(item, _Failed):
                return

    def __iter__(self) -> Prefetcher[T]:
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        item = self._ready.get()
        if item is _EXHAUSTED:
            self._done = True
            raise StopIteration
        if isinstance(item, _Failed):
            self._done = True
            raise item.error
        return item

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=self._close_wait)

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
