"""``gapaware server --init from-worker``: the run's model comes from its first worker, not from user code.

Until a worker has sent the model, the server answers as :class:`AwaitingModel`. The first worker to Join
with a layout is chosen (``JoinReply.send_initial``, worker id 0 and a secret of its own) and sends its
initial parameters (float32) and buffers as a push with ``PushHeader.initial``; the server builds its
state from them (``on_model``) and every later call goes to the parameter service (:class:`Switch`). The
chosen worker then joins again, as a worker of the run; later workers are checked against its layout as
against a task's. Other Joins meanwhile are answered ``UNAVAILABLE``, which workers retry; a chosen worker
that has sent nothing within ``grant_seconds`` loses its turn to the next one to join. The server imports
and runs none of the user's code: evaluation happens where that code is (``Report``).
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import torch

from gapaware.common.buffers import unpack_buffers
from gapaware.common.config import RunConfig
from gapaware.common.layout import ParamLayout
from gapaware.common.transport import MIN_CHUNK_BYTES, Assembler, TransportError, check_header
from gapaware.proto import parameter_server_pb2 as pb
from gapaware.proto import parameter_server_pb2_grpc as pb_grpc
from gapaware.server.limits import DEFAULT_CHUNK_TIMEOUT, DEFAULT_MIN_TRANSFER_RATE, transfer_seconds
from gapaware.server.refusal import Refused
from gapaware.server.registry import SECRET_BYTES, check_join_labels
from gapaware.server.errors import RequestRefused

log = logging.getLogger("gapaware.server")

READY_FRAME = pb.PullFrame(ready=pb.PushReady()).SerializeToString()
NO_MODEL_YET = "the server has no model yet: it takes it from the first worker that joins (--init from-worker)"


@dataclass(frozen=True)
class Grant:
    """The worker chosen to send the model: its secret, its layout and until when it may send it."""

    secret: bytes
    layout: ParamLayout
    hostname: str
    deadline: float


class AwaitingModel(pb_grpc.ParameterServerServicer):
    """The parameter service of a server that has no model yet. ``on_model(layout, theta, buffers)`` makes
    the server's state of the model a worker sent (it switches the service over before it returns);
    ``max_parameters`` bounds the model a worker may announce, since the server allocates it."""

    def __init__(self, config: RunConfig, on_model: Callable[[ParamLayout, torch.Tensor, bytes], None], *,
                 max_parameters: int, lease_seconds: float = 0.0, grant_seconds: float = 60.0,
                 chunk_timeout: float = DEFAULT_CHUNK_TIMEOUT,
                 min_transfer_rate: float = DEFAULT_MIN_TRANSFER_RATE) -> None:
        self._config = config
        self._on_model = on_model
        self._max_parameters = max_parameters
        self._lease_seconds = lease_seconds
        self._grant_seconds = grant_seconds
        self._chunk_timeout = chunk_timeout
        self._min_transfer_rate = min_transfer_rate
        self._grant: Grant | None = None
        self._receiving = False
        self._started = time.monotonic()

    async def Join(self, request: pb.JoinRequest, context) -> pb.JoinReply:
        hostname = request.hostname or context.peer()
        try:
            check_join_labels(hostname, request.device)
        except RequestRefused as error:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        if not request.layout.params:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"{NO_MODEL_YET}: join with the model's layout")
        if request.observer:
            raise Refused(grpc.StatusCode.UNAVAILABLE, f"{NO_MODEL_YET}: nothing to evaluate yet")
        layout = ParamLayout.from_proto(request.layout)
        if request.layout.fingerprint != layout.fingerprint:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "the layout's fingerprint is not that of the parameters "
                                                            "it lists: the message is corrupt or was built by other code")
        if layout.numel > self._max_parameters:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          f"the worker's model has {layout.numel} parameters; this server takes models of at most "
                          f"{self._max_parameters} (--max-model-mib)")
        now = time.monotonic()
        if self._grant is not None and (self._receiving or now < self._grant.deadline):
            raise Refused(grpc.StatusCode.UNAVAILABLE,
                          f"{NO_MODEL_YET}; the worker on {self._grant.hostname} is sending it (retry)")
        self._grant = Grant(secrets.token_bytes(SECRET_BYTES), layout, hostname, now + self._grant_seconds)
        log.info("no model yet: the worker on %s sends it (%d parameters, %d buffers)", hostname, layout.numel,
                 len(layout.buffers))
        return pb.JoinReply(worker_id=0, run_config_json=self._config.to_json(), layout=request.layout, version=0,
                            lease_seconds=self._lease_seconds, worker_secret=self._grant.secret, send_initial=True)

    async def Push(self, request_iterator, context) -> None:
        frames = aiter(request_iterator)
        header = await anext(frames, None)
        if not isinstance(header, pb.PushHeader):
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "a push must start with a header")
        grant = self._grant
        if grant is None or header.worker_id != 0 or not hmac.compare_digest(header.worker_secret, grant.secret):
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, f"{NO_MODEL_YET}; only the worker chosen at Join sends it")
        if not header.initial:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"{NO_MODEL_YET}: send the initial parameters first")
        if self._receiving:
            raise Refused(grpc.StatusCode.ABORTED, "the initial parameters are being received already")
        self._receiving = True
        try:
            theta = await self._receive(header, grant.layout, frames, context)
        finally:
            self._receiving = False
        try:
            self._on_model(grant.layout, theta, header.buffers)
        except Refused:
            self._grant = None  # a model this run cannot train: the next worker to join may send another
            raise
        log.info("the model came from the worker on %s: %d parameters", grant.hostname, theta.numel())
        await context.write(pb.PullFrame(header=pb.PullHeader(push=pb.PushReply(applied=True))))

    async def _receive(self, header: pb.PushHeader, layout: ParamLayout, frames, context) -> torch.Tensor:
        """The initial parameters, checked: float32, finite, and buffers that fit the layout."""
        try:
            if header.tensor.dtype != pb.FLOAT32:
                raise TransportError("the initial parameters travel as FLOAT32")
            nbytes = check_header(header.tensor, numel=layout.numel, min_chunk_bytes=MIN_CHUNK_BYTES)
            unpack_buffers(header.buffers, header.buffers_crc32c, layout.buffers)
            assembler = Assembler(header.tensor, numel=layout.numel, check_finite=True,
                                  min_chunk_bytes=MIN_CHUNK_BYTES)
            async with asyncio.timeout(transfer_seconds(nbytes, self._chunk_timeout, self._min_transfer_rate)):
                await context.write(READY_FRAME)
                async for frame in frames:
                    assembler.add(frame)
            theta = assembler.finish()
        except TimeoutError:
            raise Refused(grpc.StatusCode.DEADLINE_EXCEEDED, "the initial parameters arrived too slowly "
                                                             "(--chunk-timeout, --min-transfer-rate)") from None
        except TransportError as error:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"initial parameters refused: {error}") from None
        if not assembler.finite:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "initial parameters refused: they hold NaN or Inf")
        return theta

    async def Leave(self, request: pb.LeaveRequest, context) -> pb.LeaveReply:
        grant = self._grant
        if grant is not None and request.worker_id == 0 and hmac.compare_digest(request.worker_secret, grant.secret):
            self._grant = None  # the chosen worker gave up its turn: the next one to join sends the model
        return pb.LeaveReply()

    async def Pull(self, request: pb.PullRequest, context) -> None:
        raise Refused(grpc.StatusCode.UNAVAILABLE, NO_MODEL_YET)

    async def Heartbeat(self, request: pb.HeartbeatRequest, context) -> pb.HeartbeatReply:
        raise Refused(grpc.StatusCode.UNAVAILABLE, NO_MODEL_YET)

    async def Report(self, request: pb.ReportRequest, context) -> pb.ReportReply:
        raise Refused(grpc.StatusCode.UNAVAILABLE, NO_MODEL_YET)

    async def Status(self, request: pb.StatusRequest, context) -> pb.StatusReply:
        return pb.StatusReply(policy=self._config.policy, run_config_json=self._config.to_json(),
                              max_updates=self._config.max_updates, last_accuracy=math.nan, last_loss=math.nan,
                              uptime_seconds=time.monotonic() - self._started, grad_norm_limit=math.nan,
                              checkpoint_version=-1, shard_count=1, awaiting_model=True)


class Switch(pb_grpc.ParameterServerServicer):
    """The service the gRPC server answers with: ``target``, which :class:`AwaitingModel`'s ``on_model``
    replaces by the parameter service once the model arrived."""

    def __init__(self, target: pb_grpc.ParameterServerServicer) -> None:
        self.target = target

    async def Join(self, request, context):
        return await self.target.Join(request, context)

    async def Pull(self, request, context):
        return await self.target.Pull(request, context)

    async def Push(self, request_iterator, context):
        return await self.target.Push(request_iterator, context)

    async def Heartbeat(self, request, context):
        return await self.target.Heartbeat(request, context)

    async def Leave(self, request, context):
        return await self.target.Leave(request, context)

    async def Status(self, request, context):
        return await self.target.Status(request, context)

    async def Report(self, request, context):
        return await self.target.Report(request, context)
