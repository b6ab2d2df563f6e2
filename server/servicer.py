"""The gRPC adapter: unpacks requests, calls :class:`ParameterServerState`, packs replies.

No training logic lives here. Every refusal becomes one precise status code with the
domain error's message; the slow, lock-holding calls run in a thread pool so the event
loop keeps receiving other workers' gradients meanwhile.
"""
from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch

from gapaware.common.codec import CodecError, EncodedTensor, TensorAssembler, encode, itemsize
from gapaware.common.layout import ParamLayout
from gapaware.proto import parameter_server_pb2 as pb
from gapaware.proto import parameter_server_pb2_grpc as pb_grpc
from gapaware.server.errors import BadPush, LayoutMismatch, RequestRefused, StaleSnapshot, UnknownWorker
from gapaware.common.results import PushResult
from gapaware.common.wire import ChunkView, chunk_frames, frame_parser, serialize_frame
from gapaware.server.state import ParameterServerState

SERVICE_NAME = "gapaware.v1.ParameterServer"
GRADIENTS_IN_MEMORY = 2
"""Pushes received and applied at once: one is applied while the next arrives. Each holds a
model-sized buffer from its header on, so a burst of N workers pushing together would otherwise
hold N more copies of the model; the others wait, their bytes held back by gRPC flow control."""

STATUS_CODES: dict[type[Exception], grpc.StatusCode] = {
    UnknownWorker: grpc.StatusCode.NOT_FOUND,
    LayoutMismatch: grpc.StatusCode.FAILED_PRECONDITION,
    StaleSnapshot: grpc.StatusCode.FAILED_PRECONDITION,
    BadPush: grpc.StatusCode.INVALID_ARGUMENT,
    CodecError: grpc.StatusCode.INVALID_ARGUMENT,
}


def status_code_for(error: Exception) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return grpc.StatusCode.INVALID_ARGUMENT


class ParameterServerServicer(pb_grpc.ParameterServerServicer):
    def __init__(self, state: ParameterServerState, *, last_eval: Callable[[], dict] = dict,
                 lease_seconds: float = 0.0) -> None:
        self._state = state
        self._last_eval = last_eval
        self._lease_seconds = lease_seconds
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="gapaware-update")
        self._gradient_slots = asyncio.Semaphore(GRADIENTS_IN_MEMORY)

    async def _call(self, context: grpc.aio.ServicerContext, fn: Callable, *args, **kwargs):
        """Runs ``fn`` in the pool; a refusal aborts the RPC with its status code."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: fn(*args, **kwargs))
        except (RequestRefused, CodecError) as error:
            await context.abort(status_code_for(error), str(error))

    async def Join(self, request: pb.JoinRequest, context) -> pb.JoinReply:
        layout = ParamLayout.from_proto(request.layout) if request.layout.params else None
        record = await self._call(context, self._state.join, request.hostname or context.peer(),
                                  request.device, layout)
        return pb.JoinReply(
            worker_id=record.worker_id,
            run_config_json=self._state.config.to_json(),
            layout=self._state.layout.to_proto(),
            version=self._state.version,
            finished=self._state.finished,
            lease_seconds=self._lease_seconds,
        )

    async def Pull(self, request: pb.PullRequest, context) -> AsyncIterator[pb.PullFrame]:
        version, encoded = await self._call(context, self._pull_encoded, request.worker_id, request.dtype)
        async for frame in self._send_parameters(version, encoded):
            yield frame

    async def Push(self, request_iterator, context) -> pb.PushReply:
        async with self._gradient_slots:
            header, grad = await self._receive_push(request_iterator, context)
            return _push_reply(await self._call(context, self._apply_push, header, grad))

    async def PushPull(self, request_iterator, context) -> AsyncIterator[pb.PullFrame]:
        async with self._gradient_slots:
            header, grad = await self._receive_push(request_iterator, context)
            result, version, encoded = await self._call(context, self._push_then_pull, header, grad)
            del grad
        async for frame in self._send_parameters(version, encoded, push=_push_reply(result)):
            yield frame

    async def Heartbeat(self, request: pb.HeartbeatRequest, context) -> pb.HeartbeatReply:
        finished = await self._call(context, self._state.heartbeat, request.worker_id)
        return pb.HeartbeatReply(finished=finished)

    async def Leave(self, request: pb.LeaveRequest, context) -> pb.LeaveReply:
        await self._call(context, self._state.leave, request.worker_id)
        return pb.LeaveReply()

    async def Status(self, request: pb.StatusRequest, context) -> pb.StatusReply:
        return status_reply(self._state, self._last_eval())

    async def _receive_push(self, request_iterator, context) -> tuple[pb.PushHeader, torch.Tensor]:
        """The push's header and its checked gradient; a malformed stream aborts the RPC."""
        try:
            header = await anext(aiter(request_iterator))
        except StopAsyncIteration:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty push: a push starts with a header")
        if not isinstance(header, pb.PushHeader):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a push must start with a header, not a chunk")
        try:
            assembler = TensorAssembler(header.tensor, expected_numel=self._state.layout.numel)
            async for frame in request_iterator:
                if not isinstance(frame, ChunkView):
                    raise CodecError("a frame other than a chunk arrived inside a push; expected only chunks")
                assembler.add(frame)
            return header, assembler.finish()
        except CodecError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"push rejected: {error}")

    # The three below run in the pool: the update and the encoding (a copy and a checksum of the
    # whole model) stay off the event loop, in one thread hop per call.
    def _apply_push(self, header: pb.PushHeader, grad: torch.Tensor) -> PushResult:
        return self._state.push(header.worker_id, grad, base_version=header.base_version,
                                samples=header.samples, loss=header.loss)

    def _pull_encoded(self, worker_id: int, dtype: int) -> tuple[int, EncodedTensor]:
        dtype = dtype or pb.FLOAT32
        itemsize(dtype)  # an unknown dtype is refused before the worker's snapshot changes
        version, theta = self._state.pull(worker_id)
        return version, encode(theta, dtype)

    def _push_then_pull(self, header: pb.PushHeader, grad: torch.Tensor) -> tuple[PushResult, int, EncodedTensor]:
        result = self._apply_push(header, grad)
        return (result, *self._pull_encoded(header.worker_id, header.pull_dtype))

    async def _send_parameters(self, version: int, encoded: EncodedTensor,
                               push: pb.PushReply | None = None) -> AsyncIterator[pb.PullFrame | bytes]:
        yield pb.PullFrame(header=pb.PullHeader(version=version, tensor=encoded.header,
                                                finished=self._state.finished, push=push))
        for frame in chunk_frames(encoded):
            yield frame


def add_to_server(servicer: ParameterServerServicer, server: grpc.aio.Server) -> None:
    """Registers ``servicer`` like the generated ``add_ParameterServerServicer_to_server``, except
    that tensor frames are (de)serialized by :mod:`gapaware.common.wire`: chunks skip message
    objects, with the same bytes on the wire."""
    parse_push = frame_parser(pb.PushFrame)
    unary = {
        "Join": (pb.JoinRequest, pb.JoinReply), "Heartbeat": (pb.HeartbeatRequest, pb.HeartbeatReply),
        "Leave": (pb.LeaveRequest, pb.LeaveReply), "Status": (pb.StatusRequest, pb.StatusReply),
    }
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(getattr(servicer, name), request_deserializer=request.FromString,
                                                  response_serializer=reply.SerializeToString)
        for name, (request, reply) in unary.items()
    }
    handlers["Pull"] = grpc.unary_stream_rpc_method_handler(
        servicer.Pull, request_deserializer=pb.PullRequest.FromString, response_serializer=serialize_frame)
    handlers["Push"] = grpc.stream_unary_rpc_method_handler(
        servicer.Push, request_deserializer=parse_push, response_serializer=pb.PushReply.SerializeToString)
    handlers["PushPull"] = grpc.stream_stream_rpc_method_handler(
        servicer.PushPull, request_deserializer=parse_push, response_serializer=serialize_frame)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def _push_reply(result: PushResult) -> pb.PushReply:
    return pb.PushReply(version=result.version, staleness=result.staleness, mean_gap=result.mean_gap,
                        finished=result.finished, applied=result.applied)


def status_reply(state: ParameterServerState, last_eval: dict) -> pb.StatusReply:
    now = time.monotonic()
    totals = state.totals()
    workers = [
        pb.WorkerStatus(
            worker_id=w.worker_id, hostname=w.hostname, device=w.device,
            staleness=state.version - w.pulled_version if w.pulled_version is not None else 0,
            pushes=w.pushes, last_seen_seconds=now - w.last_seen, mean_gap=w.last_gap,
        )
        for w in state.live_workers()
    ]
    return pb.StatusReply(
        version=state.version, policy=state.config.policy, updates=state.version, samples=state.samples,
        epoch=state.epoch(), workers=workers, finished=state.finished, run_config_json=state.config.to_json(),
        last_accuracy=last_eval.get("accuracy", math.nan), last_loss=last_eval.get("loss", math.nan),
        mean_staleness=totals["run_mean_staleness"], mean_gap=totals["run_mean_gap"],
        uptime_seconds=now - state.started, max_updates=state.total_updates,
    )
