"""The master the virtual workers talk to: the parameter server's own state, in this process.

:class:`LocalMaster` joins N virtual workers to a :class:`ParameterServerState` built exactly as
``gapaware server`` builds it, so every pull and push goes through the server's bookkeeping
(version, staleness, θ⁽ⁱ⁾ snapshots only for policies that need them, DANA's look-ahead,
learning-rate schedule, end of run) and the server's policy code. The event loops in
:mod:`.runner` only see the :class:`Master` protocol; a test drives them through a real server
process over gRPC with an adapter of the same shape.
"""
from __future__ import annotations

import math
from typing import Protocol

from torch import Tensor

from gapaware.common.results import PushResult
from gapaware.server.state import ParameterServerState
from gapaware.simulator.wire import VirtualWire


class Master(Protocol):
    """Pull and push for virtual worker ``0 … N−1``, as a deployed worker does over gRPC."""

    def pull(self, worker: int) -> tuple[int, Tensor]:
        """The version and the parameters ``worker`` computes its next gradient on."""

    def push(self, worker: int, grad: Tensor, *, base_version: int, samples: int = 0,
             loss: float = math.nan) -> PushResult:
        """Apply ``worker``'s gradient, computed on what it pulled at ``base_version``."""


class LocalMaster:
    """``workers`` virtual workers joined to ``state``; worker ``i`` is the ``i``-th to join. Their tensors
    travel in ``push_dtype`` and ``pull_dtype`` (:class:`~.wire.VirtualWire`)."""

    def __init__(self, state: ParameterServerState, workers: int, *, push_dtype: str = "float32",
                 pull_dtype: str = "float32") -> None:
        self.state = state
        self._ids = [state.join(f"virtual-{i}", "simulated", None).worker_id for i in range(workers)]
        self._wire = VirtualWire(state, self._ids, push_dtype, pull_dtype)

    def pull(self, worker: int) -> tuple[int, Tensor]:
        return self._wire.pull(worker)

    def push(self, worker: int, grad: Tensor, *, base_version: int, samples: int = 0,
             loss: float = math.nan) -> PushResult:
        return self.state.push(self.state.admit(self._ids[worker], self._wire.gradient(worker, grad),
                                                base_version=base_version, samples=samples, loss=loss))
