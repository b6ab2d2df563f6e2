"""The parameter tensors the server hands out: θ⁽ⁱ⁾ kept per worker, replies being sent, spares.

A pull sends θ (every policy but DANA's, whose look-ahead θ̂ is computed into a tensor of its
own), and policies with a Gap keep what was sent as the worker's θ⁽ⁱ⁾ (Barkai et al., ICLR 2020;
ALGORITHMS.md, "What the master stores for GA") until the worker's next push.

**θ is lent, not copied, until it changes.** A float32 reply reads θ itself, and a float32 θ⁽ⁱ⁾
is θ itself, for as long as θ stays as it was sent. Only when an update is about to change θ does
:meth:`SentParameters.detach` copy it, once, for every reply and θ⁽ⁱ⁾ still reading it. The copy a
pull used to make is then made only where someone still needs the old θ, and never where nobody
does: a worker alone makes no copy at all (its reply is sent before it pushes, and its own θ⁽ⁱ⁾ is
θ, with every Gap 1). On a 100 MiB model that copy was a fifth of a pull's time, and a θ⁽ⁱ⁾ that
is θ takes no memory. Replies therefore read their tensor through a :class:`Loan`, under a lock
that detach takes only to switch the loan to its copy.

**The gradient's buffer becomes the copy.** When the gradient being applied arrived in one of the
server's own buffers (every streamed push), the update itself writes θ's old values into that
buffer, each element once it has read the gradient's (``old_theta_into_grad`` of the policies),
and the readers are switched to it. The copy then costs no pass of its own over memory and no
model of memory: with a burst of workers each holding a different version, that is one model
fewer at the peak. Replies wait for the update to end before they read on (an event loop awaits
:meth:`Loan.readable`, without blocking).

A fresh tensor per copy or cast costs the kernel a page fault and the zeroing of each page, which
on a 100 MiB model took more CPU than sending it. So a tensor that nobody holds any more (no
longer a worker's θ⁽ⁱ⁾ and no longer being sent) goes back to a short list of spares by dtype,
and the next copy or cast is written into a spare. The servicer receives gradients into float32
spares too, and recycles them once applied: one pool serves copies, casts and gradients, so a
gradient buffer left idle becomes the next copy of θ instead of one more model of memory. Pulls
in a reduced dtype (``bfloat16`` or ``float16`` transport, or snapshots) cast θ once into such a
tensor: a reply and a θ⁽ⁱ⁾ may be one.

Only tensors the server made for itself are ever reused: those lent to a reply (θ excepted), the
copies detach makes, and those :meth:`SentParameters.adopt` names, and only once neither a reply
nor a worker holds them. A worker that pushes again while the reply to its pull is still being
sent (only a misbehaving client does) cannot make the server overwrite what that reply reads, and
callers that pull without lending (the simulator, tests) keep tensors nobody modifies afterwards.
Loans are tracked by weak reference: a reply that ends without giving its loan back (a cancelled
call) lets its tensor be freed as usual instead of holding it forever.
"""
from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Callable
from typing import TypeVar

import torch

MAX_SPARES = 4
"""Spare tensors kept, per dtype. Each is one model of memory held between uses: two for the
gradients being received, and two for a pull-and-push cycle while another reply is still being
sent. With fewer, four workers pushing at 25 MiB allocated a fresh model-sized tensor every tenth
push instead of almost never."""

T = TypeVar("T")


class Loan:
    """The tensor a reply sends: θ itself until θ is about to change, then a copy of θ as it was
    (:meth:`SentParameters.detach`), or a tensor of its own (a cast, DANA's θ̂). Read it only
    through :meth:`read`."""

    __slots__ = ("_tensor", "_sent", "__weakref__")

    def __init__(self, tensor: torch.Tensor, sent: SentParameters) -> None:
        self._tensor = tensor
        self._sent = sent

    def read(self, fn: Callable[[torch.Tensor], T]) -> T:
        """``fn(tensor)``, with the tensor this reply sends held still meanwhile. What ``fn`` returns
        must not read the tensor afterwards (copy what is kept): θ may change once it returns.

        While an update is still writing θ's old values into the tensor (:meth:`SentParameters.detach`
        with ``into``), this waits for it; an event loop awaits :meth:`readable` first instead."""
        return self._sent.read(self, fn)

    async def readable(self) -> None:
        """Returns once :meth:`read` would not wait, without blocking the event loop meanwhile."""
        await self._sent.readable(self)


class SentParameters:
    """θ⁽ⁱ⁾ per worker, the loans of replies in flight, and spares of θ's size by dtype for the next
    pulls, for the parameters ``theta``.

    Thread-safe under its own lock, so a reply that has been sent can give its loan back from the
    event loop without waiting for the server's update lock.
    """

    def __init__(self, theta: torch.Tensor, *, max_spares: int = MAX_SPARES) -> None:
        self._theta = theta
        self._max_spares = max_spares
        self._kept: dict[int, torch.Tensor] = {}
        self._loans: list[weakref.ref[Loan]] = []
        self._reusable: list[weakref.ref[torch.Tensor]] = []  # the server's own, not reused or dropped
        self._spares: list[torch.Tensor] = []
        self._lock = threading.Lock()
        self._filling: torch.Tensor | None = None  # being written θ's old values by the update (detach)
        self._filled = threading.Condition(self._lock)
        self._waiters: list[asyncio.Future] = []  # readers on event loops awaiting _filling

    def spare(self, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """A tensor of ``dtype`` nobody holds, to write the next pull into; None when there is none."""
        with self._lock:
            return self._take_spare(dtype)

    def buffer(self) -> torch.Tensor:
        """A float32 tensor of θ's size that nobody holds: a spare, or a new one. Hand it back with
        :meth:`recycle` (or :meth:`adopt`) for it to be reused."""
        spare = self.spare()
        return torch.empty_like(self._theta) if spare is None else spare

    def adopt(self, tensor: torch.Tensor) -> None:
        """``tensor`` is the server's own (nobody outside holds it): it is reused once no reply reads
        it and no worker keeps it."""
        with self._lock:
            self._adopt(tensor)

    def recycle(self, tensor: torch.Tensor) -> None:
        """``tensor`` is the server's own and, once no reply reads it and no worker keeps it, a spare:
        DANA's θ̂ after a pull cast from it, or a received gradient once applied."""
        with self._lock:
            self._adopt(tensor)
            self._release(tensor)

    def lend(self, tensor: torch.Tensor) -> Loan:
        """The loan through which a reply reads ``tensor`` (θ itself, or the server's own tensor,
        which is not reused before the loan is given back)."""
        with self._lock:
            loan = Loan(tensor, self)
            self._loans.append(weakref.ref(loan))
            if tensor is not self._theta:
                self._adopt(tensor)
            return loan

    def give_back(self, loan: Loan) -> None:
        """The reply that read through ``loan`` is done with it."""
        with self._lock:
            self._loans = _without(self._loans, loan)
            self._release(loan._tensor)

    def read(self, loan: Loan, fn: Callable[[torch.Tensor], T]) -> T:
        """:meth:`Loan.read`: ``fn`` of the loan's tensor under this object's lock, once no update is
        writing θ's old values into it (:meth:`filled`)."""
        with self._filled:
            self._filled.wait_for(lambda: loan._tensor is not self._filling)
            return fn(loan._tensor)

    async def readable(self, loan: Loan) -> None:
        """:meth:`Loan.readable`: awaits :meth:`filled` if an update is writing into the loan's tensor."""
        with self._lock:
            if loan._tensor is not self._filling:
                return
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
        await waiter

    def keep(self, worker_id: int, snapshot: torch.Tensor) -> None:
        """Keeps ``snapshot`` (θ itself, or a tensor nobody modifies) as ``worker_id``'s θ⁽ⁱ⁾, letting
        go of the one it replaces."""
        with self._lock:
            previous = self._kept.pop(worker_id, None)
            self._kept[worker_id] = snapshot
            if previous is not None:
                self._release(previous)

    def take(self, worker_id: int) -> torch.Tensor | None:
        """Removes and returns ``worker_id``'s θ⁽ⁱ⁾ for an update; :meth:`release` it afterwards. It
        is θ itself when θ has not changed since the worker was sent it."""
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

    def detach(self, into: torch.Tensor | None = None) -> bool:
        """θ is about to change: every reply and θ⁽ⁱ⁾ still reading θ itself gets one copy of θ as it
        is now, shared by all of them. Nothing to do (no copy) when none reads θ.

        The caller holds the lock under which θ changes and pulls happen (the state's), so θ stays
        as it is and no reader is added meanwhile. The copy is made outside this object's lock:
        replies being framed wait for the switch to the copy, not for the copy.

        With ``into`` (a float32 tensor of θ's size that the caller owns: the gradient about to be
        applied) no copy is made here. The readers are switched to ``into`` at once, and True is
        returned: the update is to write θ's old values into it as it goes (``old_theta_into_grad``
        of :meth:`Policy.apply <gapaware.server.policies.base.Policy.apply>`), then call
        :meth:`filled`. Replies wait to read it until then. That saves the copy's pass over memory
        and, with a burst of pushes, the model of memory it would take: the gradient's buffer
        becomes the copy. The caller still hands ``into`` back (:meth:`recycle`) once applied.
        """
        with self._lock:
            if not self._is_read(self._theta):
                return False
            if into is not None:
                self._switch_readers(into)
                self._filling = into
                return True
        copy = self.buffer().copy_(self._theta)
        with self._lock:
            self._adopt(copy)
            self._switch_readers(copy)
            self._release(copy)  # back to the spares if its readers ended during the copy
        return False

    def filled(self) -> None:
        """The tensor :meth:`detach` was given holds θ's old values: its readers may read it."""
        with self._lock:
            self._filling = None
            self._filled.notify_all()
            waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            try:
                waiter.get_loop().call_soon_threadsafe(_wake, waiter)
            except RuntimeError:  # its event loop has closed (the server is stopping): nobody waits
                pass

    def held(self) -> int:
        """θ⁽ⁱ⁾ kept for workers."""
        with self._lock:
            return len(self._kept)

    def held_bytes(self) -> int:
        """Memory of the θ⁽ⁱ⁾ kept for workers: each distinct tensor once, θ itself not at all."""
        with self._lock:
            distinct = {id(kept): kept for kept in self._kept.values() if kept is not self._theta}
            return sum(kept.nbytes for kept in distinct.values())

    def _switch_readers(self, tensor: torch.Tensor) -> None:
        """The θ⁽ⁱ⁾ and replies reading θ read ``tensor`` instead."""
        for worker_id, kept in self._kept.items():
            if kept is self._theta:
                self._kept[worker_id] = tensor
        for loan in self._live_loans():
            if loan._tensor is self._theta:
                loan._tensor = tensor

    def _take_spare(self, dtype: torch.dtype) -> torch.Tensor | None:
        for index, spare in enumerate(self._spares):
            if spare.dtype == dtype:
                return self._spares.pop(index)
        return None

    def _live_loans(self) -> list[Loan]:
        return [loan for loan in (ref() for ref in self._loans) if loan is not None]

    def _is_read(self, tensor: torch.Tensor) -> bool:
        """Whether a worker keeps ``tensor`` as its θ⁽ⁱ⁾ or a reply in flight reads it."""
        return any(kept is tensor for kept in self._kept.values()) \
            or any(loan._tensor is tensor for loan in self._live_loans())

    def _adopt(self, tensor: torch.Tensor) -> None:
        if tensor.shape == self._theta.shape and tensor.device.type == "cpu" and tensor.is_contiguous() \
                and not any(reusable() is tensor for reusable in self._reusable):
            self._reusable.append(weakref.ref(tensor))

    def _release(self, tensor: torch.Tensor) -> None:
        """``tensor`` lost a reader: it becomes a spare if it is the server's own and nobody reads it."""
        if self._is_read(tensor):
            return
        if any(reusable() is tensor for reusable in self._reusable):
            self._reusable = _without(self._reusable, tensor)
            if sum(spare.dtype == tensor.dtype for spare in self._spares) < self._max_spares:
                self._spares.append(tensor)


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():  # a reply cancelled while it waited
        waiter.set_result(None)


def _without(refs: list[weakref.ref[T]], item: T) -> list[weakref.ref[T]]:
    """``refs`` less those to ``item`` and those whose object is gone."""
    return [ref for ref in refs if ref() is not None and ref() is not item]
