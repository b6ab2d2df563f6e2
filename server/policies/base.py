"""The interface every staleness policy implements, and the bookkeeping they share.

A policy turns one push (a worker's gradient, its staleness and, where needed, the parameters
the worker computed it on) into an in-place update of the master's flat float32 parameters
``theta``. The arithmetic lives in pure functions over flat tensors (``sgd.py``, and one file
per policy); the classes here only hold state and validate what comes in.
"""
from __future__ import annotations

import abc
import math
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from torch import Tensor

CPU_CHUNK = 1 << 18
"""Elements per slice when a policy walks a CPU tensor (1 MiB of float32 per tensor touched).

Every update is element-wise, so policies apply it slice by slice: a slice's temporaries stay in
cache and live in two preallocated scratch buffers, so main memory sees each state tensor about
once and nothing of full size is allocated (a fresh 100 MB tensor costs more in page faults than
the arithmetic, and freeing even 1 MiB temporaries can make malloc hand pages back each time).
"""


def take_tensor(state: dict[str, Tensor], key: str, like: Tensor) -> Tensor:
    """Pop ``state[key]``, checking it has the shape and dtype of ``like``."""
    if key not in state:
        raise ValueError(f"Missing key in policy state: {key!r}")
    value = state.pop(key)
    if value.shape != like.shape or value.dtype != like.dtype:
        raise ValueError(f"Policy state {key!r} has shape {tuple(value.shape)} and dtype {value.dtype}, "
                         f"expected {tuple(like.shape)} and {like.dtype}")
    return value


def _check_lr(lr: float) -> None:
    if not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"Invalid learning rate: {lr}")


class Policy(abc.ABC):
    """One staleness policy: how the master applies a (possibly stale) gradient.

    Args:
        numel: number of parameters (length of the flat ``theta``).
        momentum: μ, 0 disables (default 0).
        nesterov: Nesterov momentum (default False; needs μ > 0).
        weight_decay: λ, coupled L2 added to the gradient as ``λ·θ`` (default 0).
    """

    name: ClassVar[str]
    """The CLI name (``--policy``)."""
    needs_snapshot: ClassVar[bool] = False
    """True when the server must keep θ⁽ⁱ⁾ per worker and pass it to :meth:`apply` as ``stale_theta``."""
    pulls_theta: ClassVar[bool] = True
    """True when a pull sends θ itself (:meth:`pull_view` copies it), which the server may then cast
    straight into a reduced transport dtype; False when it computes something else from θ."""

    def __init__(self, numel: int, *, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0) -> None:
        if not isinstance(numel, int) or numel < 1:
            raise ValueError(f"Invalid numel: {numel}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if nesterov and momentum <= 0:
            raise ValueError(f"Nesterov momentum requires a momentum > 0, got: {momentum}")
        if not 0.0 <= weight_decay < math.inf:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        self.numel = numel
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        self.weight_decay = float(weight_decay)
        self._scratch: tuple[Tensor, Tensor] | None = None

    def hyperparameters(self) -> dict[str, Any]:
        """The settings this policy was built with."""
        return {"momentum": self.momentum, "nesterov": self.nesterov, "weight_decay": self.weight_decay}

    @torch.no_grad()
    def apply(self, theta: Tensor, grad: Tensor, *, lr: float, staleness: int,
              stale_theta: Tensor | None = None, worker_id: int = 0, old_theta_into_grad: bool = False) -> float:
        """Apply one push from ``worker_id`` to ``theta`` in place; return the mean Gap of the update.

        ``lr`` is η for this update (after schedule and warm-up), ``staleness`` is τ, and
        ``stale_theta`` is θ⁽ⁱ⁾, required when :attr:`needs_snapshot`. Policies without a Gap
        return 1.0.

        With ``old_theta_into_grad`` the update leaves θ as it was before it in ``grad``, each
        element written once the update has read it: a copy of the old θ made in the same pass
        over memory, for the server's readers of θ (:meth:`SentParameters.detach
        <gapaware.server.sent.SentParameters.detach>`), with no buffer of its own.
        """
        self._check_vector("theta", theta)
        self._check_vector("grad", grad)
        _check_lr(lr)
        if staleness < 0:
            raise ValueError(f"Invalid staleness: {staleness}")
        if self.needs_snapshot:
            if stale_theta is None:
                raise ValueError(f"Policy {self.name!r} needs stale_theta, the parameters the worker was sent")
            self._check_vector("stale_theta", stale_theta)
        return self._apply(theta, grad, stale_theta, lr=lr, staleness=staleness, worker_id=worker_id,
                           old_theta_into_grad=old_theta_into_grad)

    @abc.abstractmethod
    def _apply(self, theta: Tensor, grad: Tensor, stale_theta: Tensor | None, *,
               lr: float, staleness: int, worker_id: int, old_theta_into_grad: bool) -> float:
        """:meth:`apply` after its arguments were checked."""

    @torch.no_grad()
    def pull_view(self, theta: Tensor, *, lr: float, worker_id: int, out: Tensor | None = None) -> Tensor:
        """What ``worker_id`` is sent when it pulls, at learning rate ``lr``: written to ``out`` (a
        tensor shaped like ``theta`` that nothing else reads) and returned, or a new tensor when None."""
        self._check_vector("theta", theta)
        _check_lr(lr)
        if out is not None:
            self._check_vector("out", out)
        return self._pull_view(theta, lr=lr, worker_id=worker_id, out=out)

    def _pull_view(self, theta: Tensor, *, lr: float, worker_id: int, out: Tensor | None) -> Tensor:
        """:meth:`pull_view` after its arguments were checked: here a copy of ``theta``."""
        return theta.clone() if out is None else out.copy_(theta)

    def forget_worker(self, worker_id: int) -> None:
        """Drop the per-worker state of a worker that left (none here)."""

    def worker_ids(self) -> list[int]:
        """The workers this policy keeps per-worker state for (none here)."""
        return []

    def state_dict(self) -> dict[str, Tensor]:
        """A copy of all policy state, as tensors (scalars as 0-d tensors) that safetensors can save."""
        return {key: value.clone() for key, value in self._state().items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what :meth:`state_dict` returned; refuses missing, unexpected or mis-shaped entries
        with a ``ValueError`` (the policy may then be partly loaded: build a new one to retry)."""
        remaining = dict(state)
        self._load_state(remaining)
        if remaining:
            raise ValueError(f"Unexpected keys in {self.name!r} policy state: {sorted(remaining)}")

    def _state(self) -> dict[str, Tensor]:
        """All state tensors by key (the live ones; :meth:`state_dict` copies them)."""
        return {}

    def _load_state(self, state: dict[str, Tensor]) -> None:
        """Pop this policy's keys from ``state`` and install them."""

    def _parts(self, theta: Tensor) -> Iterator[tuple[slice, tuple[Tensor, Tensor]]]:
        """Slices covering the parameters, each with two scratch tensors of its length.

        Cache-sized slices (:data:`CPU_CHUNK`) on the CPU, one slice on other devices. The scratch
        buffers are allocated on first use and reused by every update.
        """
        size = min(CPU_CHUNK, self.numel) if theta.device.type == "cpu" else self.numel
        scratch = self._scratch
        if scratch is None or scratch[0].device != theta.device or scratch[0].dtype != theta.dtype \
                or scratch[0].numel() != size:
            self._scratch = scratch = (theta.new_empty(size), theta.new_empty(size))
        for start in range(0, self.numel, size):
            length = min(size, self.numel - start)
            yield slice(start, start + length), (scratch[0][:length], scratch[1][:length])

    @staticmethod
    def _step_keeping(step: Callable[[], None], theta: Tensor, grad: Tensor | None, scratch: Tensor) -> None:
        """Runs ``step`` (which changes the slice ``theta``); with ``grad`` (the slice's gradient, read
        already), θ's values from before the step end up in ``grad``. They go through ``scratch`` (a
        free scratch slice, in cache): the step may still read the gradient (``d = g`` when λ = 0)."""
        if grad is None:
            step()
            return
        old = scratch.copy_(theta)
        step()
        grad.copy_(old)

    def _check_vector(self, what: str, tensor: Tensor) -> None:
        if tensor.shape != (self.numel,):
            raise ValueError(f"Invalid {what}: expected a flat tensor of {self.numel} elements, "
                             f"got shape {tuple(tensor.shape)}")
