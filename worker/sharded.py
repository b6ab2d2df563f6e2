"""One model over several servers: a client that talks to every shard and looks like one :class:`WorkerClient`.

``gapaware server --shard I/S`` serves the slice of the flat parameter vector that
:mod:`gapaware.common.shards` gives shard I. :class:`ShardedClient` holds one :class:`WorkerClient` per
shard, in shard order, and presents the WorkerClient interface the training loop uses: a pull or a push
goes to every shard at once, from a thread per shard, so a step costs one round trip, not S. The
parameters come back assembled into one flat tensor; a push sends each shard its slice of the gradient.

* **Versions**: each shard counts its own updates. The version this client returns is shard 0's; it
  remembers every shard's, and a push tells each shard its own base version.
* **Staleness and Gap**: a push's result is the aggregate: the largest staleness of any shard, the mean
  Gap over the whole model (each shard's mean weighted by its size), applied when every shard applied
  it. :attr:`ShardedClient.last_results` holds the shards' own results.
* **The run's end** is shard 0's word. Leaving after it, the client tells the other shards, which then
  end too (a shard behind shard 0 after a restart would otherwise wait for pushes that never come).
* **Failures**: a shard that cannot be reached fails the whole call, which the loop retries as for one
  server; the shards that had applied the push answer the retried copy as a copy (exactly once). A
  shard that forgot this worker (lease, restart) is joined again alone, and only its slice is pulled
  afresh: its slice of that gradient is dropped, the other shards' applied.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import grpc
import torch

from gapaware.common.layout import ParamLayout
from gapaware.common.results import PushResult
from gapaware.common.shards import Shard, run_identity, shard_cuts, shard_layout
from gapaware.proto import parameter_server_pb2 as pb
from gapaware.worker.client import JoinInfo, WorkerClient

T = TypeVar("T")

log = logging.getLogger("gapaware.worker")


def split_addresses(addresses: str) -> list[str]:
    """``H0:P0,H1:P1,...`` (``--server``) as a list, in shard order."""
    parts = [part.strip() for part in addresses.split(",")]
    if not all(parts):
        raise ValueError(f"Invalid server list {addresses!r}: give HOST:PORT of every shard, comma-separated")
    return parts


def connect(addresses: str, **client_options) -> WorkerClient | ShardedClient:
    """A :class:`WorkerClient` for one address, a :class:`ShardedClient` for a comma-separated list."""
    parts = split_addresses(addresses)
    return WorkerClient(parts[0], **client_options) if len(parts) == 1 else ShardedClient(parts, **client_options)


class ShardedClient:
    """A connection to every shard of a sharded run, as one worker; ``client_options`` are
    :class:`WorkerClient`'s, the same for every shard."""

    def __init__(self, addresses: list[str], **client_options) -> None:
        self.address = ",".join(addresses)
        self.shards = [WorkerClient(address, **client_options) for address in addresses]
        self._pool = ThreadPoolExecutor(max_workers=len(addresses), thread_name_prefix="gapaware-shard")
        self._info: JoinInfo | None = None
        self._layouts: list[ParamLayout] = []
        self._cuts: list[int] = []
        self._versions: list[int] = []
        self._device, self._observer = "cpu", False
        self._run = ""
        self._seq = 0
        self._finished = False
        self.last_results: list[PushResult] = []
        """Each shard's own result of the last push."""
        self.buffers: dict[str, torch.Tensor] = {}
        """The model's buffers (they live on shard 0) as of the last parameters received."""

    # -- lifecycle ------------------------------------------------------------------------
    def join(self, layout: ParamLayout | None = None, *, device: str = "cpu", initial=None,
             observer: bool = False) -> JoinInfo:
        """Joins every shard: shard 0 first, whose run the others must run (their run configs' digest).
        ``initial`` is never asked for: the servers of a sharded run build their model with ``--task``.
        An ``observer`` joins every shard only to pull (``gapaware evaluate``)."""
        if layout is None:
            raise ValueError("a sharded run needs the model's layout to join: pass ParamLayout.from_module(model)")
        count = len(self.shards)
        self._layouts = [shard_layout(layout, Shard(index, count)) for index in range(count)]
        self._cuts = shard_cuts(layout, count)
        self._device, self._observer = device, observer
        first = self.shards[0].join(self._layouts[0], device=device, observer=observer)
        self._run = run_identity(first.config)
        joined = [first, *self._each(lambda i, c: self._join_shard(i), indices=range(1, count))]
        self._versions = [info.version for info in joined]
        self._finished = first.finished
        self._info = JoinInfo(worker_id=first.worker_id, config=first.config, layout=layout, version=first.version,
                              finished=first.finished, lease_seconds=min(info.lease_seconds for info in joined),
                              worker_secret=first.worker_secret)
        return self._info

    def _join_shard(self, index: int) -> JoinInfo:
        return self.shards[index].join(self._layouts[index], device=self._device, observer=self._observer,
                                       run_config_sha256=self._run if index else "")

    @property
    def info(self) -> JoinInfo:
        if self._info is None:
            raise RuntimeError("join() first: the servers assign the worker ids at Join")
        return self._info

    def leave(self) -> None:
        """Leaves every shard; after shard 0 ended the run, tells the others it did."""
        self._each(lambda i, c: c.leave(run_finished=self._finished and i > 0))
        self._info = None

    def heartbeat(self, timeout: float | None = None) -> bool:
        """Renews the lease on every shard; True once shard 0 says the run is over. Another shard's
        failure is not raised: a shard that forgot this worker says so at the next push."""
        futures = [self._pool.submit(c.heartbeat, timeout) for c in self.shards]
        for future in futures[1:]:
            future.exception()
        self._finished = futures[0].result() or self._finished
        return self._finished

    def status(self) -> pb.StatusReply:
        """Shard 0's status: the run's (:meth:`statuses` has every shard's)."""
        return self.shards[0].status()

    def statuses(self) -> list[pb.StatusReply]:
        return self._each(lambda i, c: c.status())

    def answers(self, timeout: float, *, wait_for_connection: bool = True) -> bool:
        """Whether every shard answers within ``timeout`` seconds (:meth:`WorkerClient.answers`)."""
        return all(self._each(lambda i, c: c.answers(timeout, wait_for_connection=wait_for_connection)))

    def close(self) -> None:
        for client in self.shards:
            client.close()
        self._pool.shutdown()

    def __enter__(self) -> ShardedClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- parameters and gradients ---------------------------------------------------------
    def pull(self, *, out: torch.Tensor | None = None) -> tuple[int, torch.Tensor]:
        """Every shard's parameters, assembled (``out`` as in :meth:`WorkerClient.pull`), and shard 0's version."""
        theta = torch.empty(self.info.layout.numel) if out is None else out
        self._versions = self._each(lambda i, c: self._pull_shard(i, theta))
        return self._versions[0], theta

    def _pull_shard(self, index: int, theta: torch.Tensor) -> int:
        return self._rejoining(index, lambda: self.shards[index].pull(out=self._slice(theta, index)))[0]

    def next_seq(self) -> int:
        """A new push sequence number: pass it as ``seq`` to every attempt of one push."""
        self._seq += 1
        return self._seq

    def push(self, grad: torch.Tensor, base_version: int, *, samples: int = 0, loss: float = math.nan,
             seq: int | None = None, buffers: dict[str, torch.Tensor] | None = None) -> PushResult:
        """:meth:`WorkerClient.push` to every shard: each gets its slice and its own base version."""
        return self._push(grad, base_version, samples, loss, seq, buffers, None)[0]

    def push_pull(self, grad: torch.Tensor, base_version: int, *, samples: int = 0, loss: float = math.nan,
                  seq: int | None = None, buffers: dict[str, torch.Tensor] | None = None,
                  out: torch.Tensor | None = None) -> tuple[PushResult, int, torch.Tensor]:
        """:meth:`WorkerClient.push_pull` to every shard; the parameters come back assembled."""
        theta = torch.empty(self.info.layout.numel) if out is None else out
        result, version = self._push(grad, base_version, samples, loss, seq, buffers, theta)
        return result, version, theta

    def _push(self, grad: torch.Tensor, base_version: int, samples: int, loss: float, seq: int | None,
              buffers: dict[str, torch.Tensor] | None, theta: torch.Tensor | None) -> tuple[PushResult, int]:
        if grad.dim() != 1 or grad.numel() != self.info.layout.numel:
            raise ValueError(f"gradient must be flat with {self.info.layout.numel} elements, "
                             f"got shape {tuple(grad.shape)}")
        if base_version != self._versions[0]:
            raise ValueError(f"base_version {base_version} is not the version last pulled ({self._versions[0]}): "
                             "a sharded client pushes gradients of the parameters it received last")
        seq = self.next_seq() if seq is None else seq
        bases = list(self._versions)

        def push_shard(index: int, client: WorkerClient) -> tuple[PushResult, int]:
            kwargs = dict(samples=samples, loss=loss, seq=seq, buffers=buffers if index == 0 else None)
            part = self._slice(grad, index)
            if theta is None:
                result = client.push(part, bases[index], **kwargs)
                return result, result.version
            try:
                result, version, _ = client.push_pull(part, bases[index], out=self._slice(theta, index), **kwargs)
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                version = self._pull_shard(index, theta)  # joins it again first
                result = PushResult(version=version, staleness=0, mean_gap=1.0, finished=False, applied=False)
            return result, version

        answers = self._each(push_shard)
        self.last_results = [result for result, _ in answers]
        self._versions = [version for _, version in answers]
        if theta is not None:
            self.buffers = self.shards[0].buffers
        self._finished = self.last_results[0].finished or self._finished
        return self._aggregate(self.last_results), self._versions[0]

    def _aggregate(self, results: list[PushResult]) -> PushResult:
        numel = self.info.layout.numel
        sizes = [stop - start for start, stop in zip(self._cuts, self._cuts[1:])]
        gap = sum(size * result.mean_gap for size, result in zip(sizes, results)) / numel
        return PushResult(version=results[0].version, staleness=max(result.staleness for result in results),
                          mean_gap=gap, finished=results[0].finished, applied=all(r.applied for r in results))

    def report(self, version: int, metrics: dict[str, float], error: str = "") -> None:
        """:meth:`WorkerClient.report` to shard 0, whose version the run's is."""
        self.shards[0].report(version, metrics, error)

    # -- helpers ----------------------------------------------------------------------------
    def _slice(self, flat: torch.Tensor, index: int) -> torch.Tensor:
        return flat[self._cuts[index]:self._cuts[index + 1]]

    def _rejoining(self, index: int, call: Callable[[], T]) -> T:
        """``call()`` on shard ``index``; when that shard forgot this worker, joins it again alone, then calls again."""
        try:
            return call()
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise
            log.warning("shard %d (%s) forgot this worker (%s): joining it again alone", index,
                        self.shards[index].address, error.details())
        info = self._join_shard(index)
        if index == 0:
            self._info = JoinInfo(worker_id=info.worker_id, config=info.config, layout=self.info.layout,
                                  version=info.version, finished=info.finished,
                                  lease_seconds=self.info.lease_seconds, worker_secret=info.worker_secret)
        return call()

    def _each(self, fn: Callable[[int, WorkerClient], T], indices=None) -> list[T]:
        """``fn(index, client)`` for every shard (or those of ``indices``) at once; the first failure is
        raised once all have ended."""
        indices = range(len(self.shards)) if indices is None else indices
        futures = [self._pool.submit(fn, index, self.shards[index]) for index in indices]
        errors = [future.exception() for future in futures]
        for error in errors:
            if error is not None:
                raise error
        return [future.result() for future in futures]
