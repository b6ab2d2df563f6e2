"""The server's real gRPC stack (``build_grpc_server``) inside the test process.

Faster to start than a ``gapaware server`` process, and the test can look at the
:class:`ParameterServerState` directly: parameters, version, policy state.
"""
from __future__ import annotations

import asyncio
import dataclasses
import threading

import torch

from gapaware.common.config import RunConfig
from gapaware.common.layout import ParamLayout
from gapaware.server.app import ServerOptions, build_grpc_server
from gapaware.server.observability import ServerMetrics
from gapaware.server.state import ParameterServerState


def small_state(numel: int = 1000, *, policy: str = "gap-aware", momentum: float = 0.9, nonfinite: str = "reject",
                seed: int = 0, snapshot_dtype: str = "float32", grad_norm_bound: float = 0.0) -> ParameterServerState:
    """A state for a one-tensor model of ``numel`` parameters, with a long run ahead of it (and, unless
    ``grad_norm_bound`` is given, no push bound)."""
    config = RunConfig(task="synthetic", policy=policy, momentum=momentum, lr=0.1, schedule="constant",
                       max_updates=10**9, snapshot_dtype=snapshot_dtype)
    theta = torch.randn(numel, generator=torch.Generator().manual_seed(seed))
    return ParameterServerState(config, ParamLayout(("w",), ((numel,),)), theta, train_size=1000,
                                nonfinite=nonfinite, grad_norm_bound=grad_norm_bound)


@dataclasses.dataclass(frozen=True)
class StateSnapshot:
    """Everything a refused request must leave as it was."""

    version: int
    theta: torch.Tensor
    policy_state: dict[str, torch.Tensor]
    samples: int

    @classmethod
    def of(cls, state: ParameterServerState) -> StateSnapshot:
        version, theta = state.parameters()
        return cls(version, theta, state.policy.state_dict(), state.samples)

    def assert_same(self, other: StateSnapshot) -> None:
        assert (other.version, other.samples) == (self.version, self.samples)
        assert torch.equal(other.theta, self.theta), "the parameters changed"
        assert other.policy_state.keys() == self.policy_state.keys()
        for key, value in self.policy_state.items():
            assert torch.equal(other.policy_state[key], value), f"policy state {key!r} changed"


class InProcessServer:
    """Serves ``state`` on a loopback port (``port``, or a free one) from an event loop in a background thread."""

    def __init__(self, state: ParameterServerState, options: ServerOptions | None = None, port: int = 0,
                 metrics: ServerMetrics | None = None) -> None:
        self.state = state
        self._metrics = metrics
        self._options = dataclasses.replace(options or ServerOptions(), host="127.0.0.1", port=port)
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._serve(),), daemon=True)
        self._thread.start()
        if not self._started.wait(timeout=30) or self._error:
            raise RuntimeError(f"the in-process server did not start: {self._error!r}")
        self.address = f"127.0.0.1:{self.port}"

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        try:
            server, self.port, _ = build_grpc_server(self.state, self._options, metrics=self._metrics)
            await server.start()
        except BaseException as error:
            self._error = error
            self._started.set()
            raise
        self._started.set()
        await self._stop.wait()
        await server.stop(grace=0)

    def close(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout=30)
        self._loop.close()
