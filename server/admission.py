"""Which pushes the server receives now: one at a time per worker, a few at a time in all.

Every push is received into a model-sized gradient buffer, so a burst of N workers pushing at once
would hold N more copies of the model. :class:`PushAdmission` lets :data:`GRADIENTS_IN_MEMORY` in at
once: one is applied while the next arrives. The others wait with no bytes at the server: the
worker sends a push's chunks only once the server's ready frame says it is admitted.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import torch

from gapaware.server.errors import PushInFlight
from gapaware.server.model_store import ModelStore

GRADIENTS_IN_MEMORY = 2


class PushAdmission:
    """Admits pushes on the event loop; the buffers come from, and go back to, ``model``'s spares."""

    def __init__(self, model: ModelStore, slots: int = GRADIENTS_IN_MEMORY) -> None:
        self._model = model
        self._slots = asyncio.Semaphore(slots)
        self._in_flight: set[int] = set()

    @contextlib.asynccontextmanager
    async def admitted(self, worker_id: int) -> AsyncIterator[torch.Tensor]:
        """A gradient buffer for the worker's push, once a slot is free. A second push of the same
        worker while its first is in flight is refused (:class:`PushInFlight`). The buffer is a spare
        again once the block ends, unless the call was cancelled: an update in a pool thread may then
        still be reading it, and it is left to the garbage collector."""
        if worker_id in self._in_flight:
            raise PushInFlight(worker_id)
        self._in_flight.add(worker_id)
        try:
            async with self._slots:
                buffer = self._model.spare()
                try:
                    yield buffer
                except asyncio.CancelledError:
                    buffer = None
                    raise
                finally:
                    self._model.recycle(buffer)
        finally:
            self._in_flight.discard(worker_id)
