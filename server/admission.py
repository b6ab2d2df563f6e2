"""Which pushes the server receives now: one at a time per worker, a few at a time in all.

Every push is received into a model-sized gradient buffer, so a burst of N workers pushing at once
would hold N more copies of the model. :class:`PushAdmission` lets :data:`GRADIENTS_IN_MEMORY` in at
once: one is applied while the next arrives. The others wait with no bytes at the server: the
worker sends a push's chunks only once the server's ready frame says it is admitted.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator

import torch

from gapaware.server.errors import PushInFlight, RequestRefused
from gapaware.server.model_store import ModelStore

GRADIENTS_IN_MEMORY = 2


class OneAtATime:
    """The workers with a call of one kind in progress; a second such call of the same worker, while
    the first is, is refused with ``refusal(worker_id)``. Used on the event loop only."""

    def __init__(self, refusal: Callable[[int], RequestRefused]) -> None:
        self._refusal = refusal
        self._busy: set[int] = set()

    @contextlib.contextmanager
    def held(self, worker_id: int) -> Iterator[None]:
        if worker_id in self._busy:
            raise self._refusal(worker_id)
        self._busy.add(worker_id)
        try:
            yield
        finally:
            self._busy.discard(worker_id)


class PushAdmission:
    """Admits pushes on the event loop; the buffers come from, and go back to, ``model``'s spares."""

    def __init__(self, model: ModelStore, slots: int = GRADIENTS_IN_MEMORY) -> None:
        self._model = model
        self._slots = asyncio.Semaphore(slots)
        self._pushing = OneAtATime(PushInFlight)

    @contextlib.asynccontextmanager
    async def admitted(self, worker_id: int) -> AsyncIterator[torch.Tensor]:
        """A gradient buffer for the worker's push, once a slot is free. A second push of the same
        worker while its first is in flight is refused (:class:`PushInFlight`). The buffer is a spare
        again once the block ends, unless the call was cancelled: an update in a pool thread may then
        still be reading it, and it is left to the garbage collector."""
        with self._pushing.held(worker_id):
            async with self._slots:
                buffer = self._model.spare()
                try:
                    yield buffer
                except asyncio.CancelledError:
                    buffer = None
                    raise
                finally:
                    self._model.recycle(buffer)
