"""The parameter tensors the server hands out: θ⁽ⁱ⁾ kept per worker, replies being sent, spares.

Every pull produces a model-sized tensor (a copy of θ, or DANA's look-ahead θ̂). Policies with a
Gap keep it as the worker's θ⁽ⁱ⁾ (Barkai et al., ICLR 2020; ALGORITHMS.md, "What the master
stores for GA") until the worker's next push, and the reply to the pull reads it while gRPC sends
it. A fresh tensor per pull costs the kernel a page fault and the zeroing of each page, which on a
100 MiB model took more CPU than sending it. So a tensor that nobody holds any more (no longer a
worker's θ⁽ⁱ⁾ and no longer being sent) goes back to a short list of spares, and the next pull is
written into a spare.

Pulls in a reduced dtype (``bfloat16`` or ``float16`` transport, or snapshots) use tensors of that
dtype the same way: a reply and a θ⁽ⁱ⁾ may be one tensor, cast once from θ.

Only tensors the server made for itself are ever reused: those lent to a reply, and those
:meth:`SentParameters.adopt` names (a θ⁽ⁱ⁾ in a reduced dtype, or a float32 one whose reply reads a
cast of it), and only once neither a reply nor a worker holds them. A worker that pushes again
while the reply to its pull is still being sent (only a misbehaving client does) cannot make the
server overwrite what that reply reads, and callers that pull without lending (the simulator,
tests) keep tensors nobody modifies afterwards. Lent tensors are tracked by weak reference: a
reply that ends without giving its tensor back (a cancelled call) lets it be freed as usual
instead of holding it forever.
"""
from __future__ import annotations

import threading
import weakref

import torch

MAX_SPARES = 2
"""Spare tensors kept for the next pulls, per dtype. Each is one model of memory held between pulls;
two cover a pull-and-push cycle while another reply is still being sent."""


class SentParameters:
    """θ⁽ⁱ⁾ per worker, the tensors lent to replies in flight, and spares of ``numel`` elements by
    dtype for the next pulls.

    Thread-safe under its own lock, so a reply that has been sent can hand its tensor back from
    the event loop without waiting for the server's update lock.
    """

    def __init__(self, numel: int, *, max_spares: int = MAX_SPARES) -> None:
        self._numel = numel
        self._max_spares = max_spares
        self._kept: dict[int, torch.Tensor] = {}
        self._lent: list[weakref.ref[torch.Tensor]] = []
        self._reusable: list[weakref.ref[torch.Tensor]] = []  # the server's own, not reused or dropped
        self._spares: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def spare(self, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """A tensor of ``dtype`` nobody holds, to write the next pull into; None when there is none."""
        with self._lock:
            for index, spare in enumerate(self._spares):
                if spare.dtype == dtype:
                    return self._spares.pop(index)
            return None

    def adopt(self, tensor: torch.Tensor) -> None:
        """``tensor`` is the server's own (nobody outside holds it): it is reused once no reply reads
        it and no worker keeps it."""
        with self._lock:
            self._adopt(tensor)

    def lend(self, tensor: torch.Tensor) -> None:
        """``tensor`` is being sent: it is not reused before :meth:`give_back`, and may be after."""
        with self._lock:
            self._lent.append(weakref.ref(tensor))
            self._adopt(tensor)

    def give_back(self, tensor: torch.Tensor) -> None:
        """The reply that read ``tensor`` is done with it."""
        with self._lock:
            self._lent = _without(self._lent, tensor)
            if not any(kept is tensor for kept in self._kept.values()):
                self._recycle(tensor)

    def keep(self, worker_id: int, snapshot: torch.Tensor) -> None:
        """Keeps ``snapshot`` as ``worker_id``'s θ⁽ⁱ⁾, letting go of the one it replaces."""
        with self._lock:
            previous = self._kept.pop(worker_id, None)
            self._kept[worker_id] = snapshot
            if previous is not None:
                self._release(previous)

    def take(self, worker_id: int) -> torch.Tensor | None:
        """Removes and returns ``worker_id``'s θ⁽ⁱ⁾ for an update; :meth:`release` it afterwards."""
        with self._lock:
            return self._kept.pop(worker_id, None)

    def release(self, snapshot: torch.Tensor) -> None:
        """An update no longer reads ``snapshot`` (from :meth:`take`)."""
        with self._lock:
            self._release(snapshot)

    def forget(self, worker_id: int) -> None:
        """Lets go of ``worker_id``'s θ⁽ⁱ⁾ (the worker left or its lease expired)."""
        with self._lock:
            snapshot = self._kept.pop(worker_id, None)
            if snapshot is not None:
                self._release(snapshot)

    def held(self) -> int:
        """θ⁽ⁱ⁾ kept for workers."""
        with self._lock:
            return len(self._kept)

    def held_bytes(self) -> int:
        """Bytes of the θ⁽ⁱ⁾ kept for workers."""
        with self._lock:
            return sum(snapshot.nbytes for snapshot in self._kept.values())

    def _adopt(self, tensor: torch.Tensor) -> None:
        if tensor.shape == (self._numel,) and tensor.device.type == "cpu" and tensor.is_contiguous() \
                and not any(reusable() is tensor for reusable in self._reusable):
            self._reusable.append(weakref.ref(tensor))

    def _release(self, snapshot: torch.Tensor) -> None:
        if not any(lent() is snapshot for lent in self._lent):
            self._recycle(snapshot)

    def _recycle(self, tensor: torch.Tensor) -> None:
        """Keeps the server's own ``tensor`` as a spare while there is room for its dtype; any other is
        freed with its last reference."""
        if any(reusable() is tensor for reusable in self._reusable):
            self._reusable = _without(self._reusable, tensor)
            if sum(spare.dtype == tensor.dtype for spare in self._spares) < self._max_spares:
                self._spares.append(tensor)


def _without(refs: list[weakref.ref[torch.Tensor]], tensor: torch.Tensor) -> list[weakref.ref[torch.Tensor]]:
    """``refs`` less those to ``tensor`` and those whose tensor is gone."""
    return [ref for ref in refs if ref() is not None and ref() is not tensor]
