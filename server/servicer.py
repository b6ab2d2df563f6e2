"""The gRPC adapter: unpacks requests, calls :class:`ParameterServerState`, packs replies.

No training logic lives here. Every refusal becomes one precise status code with the
domain error's message; the slow, lock-holding calls run in a thread pool so the event
loop keeps receiving other workers' gradients meanwhile.
"""
from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch

from gapaware.common.codec import CodecError, TensorAssembler, chunk_messages, encode, itemsize
from gapaware.common.layout import ParamLayout
from gapaware.proto import parameter_server_pb2 as pb
from gapaware.proto import parameter_server_pb2_grpc as pb_grpc
from gapaware.server.errors import (
    BadPush, InvalidLayout, LayoutMismatch, PushInFlight, RequestRefused, StaleSnapshot, UnknownWorker,
)
from gapaware.common.results import PushResult
from gapaware.server.observability import ServerMetrics, rejection_reason
from gapaware.server.state import ParameterServerState

STATUS_CODES: dict[type[Exception], grpc.StatusCode] = {
    UnknownWorker: grpc.StatusCode.NOT_FOUND,
    LayoutMismatch: grpc.StatusCode.FAILED_PRECONDITION,
    StaleSnapshot: grpc.StatusCode.FAILED_PRECONDITION,
    BadPush: grpc.StatusCode.INVALID_ARGUMENT,
    CodecError: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidLayout: grpc.StatusCode.INVALID_ARGUMENT,
    PushInFlight: grpc.StatusCode.ABORTED,
}


def status_code_for(error: Exception) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return grpc.StatusCode.INVALID_ARGUMENT


class ParameterServerServicer(pb_grpc.ParameterServerServicer):
    def __init__(self, state: ParameterServerState, *, last_eval: Callable[[], dict] = dict,
                 lease_seconds: float = 0.0, metrics: ServerMetrics | None = None,
                 chunk_timeout: float = 60.0) -> None:
        self._state = state
        self._chunk_timeout = chunk_timeout
        self._last_eval = last_eval
        self._lease_seconds = lease_seconds
        self._metrics = metrics or ServerMetrics(state)
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="gapaware-update")
        self._pushes_in_flight: set[int] = set()  # worker ids; touched only on the event loop

    async def _call(self, context: grpc.aio.ServicerContext, fn: Callable, *args,
                    on_refusal: Callable[[str], None] | None = None, **kwargs):
        """Runs ``fn`` in the pool; a refusal aborts the RPC with its status code (and is reported
        to ``on_refusal`` by reason first, for the metrics)."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: fn(*args, **kwargs))
        except (RequestRefused, CodecError) as error:
            if on_refusal is not None:
                on_refusal(rejection_reason(error))
            await context.abort(status_code_for(error), str(error))

    async def Join(self, request: pb.JoinRequest, context) -> pb.JoinReply:
        layout = ParamLayout.from_proto(request.layout) if request.layout.params else None
        record = await self._call(context, self._state.join, request.hostname or context.peer(),
                                  request.device, layout, fingerprint=request.layout.fingerprint)
        return pb.JoinReply(
            worker_id=record.worker_id,
            run_config_json=self._state.config.to_json(),
            layout=self._state.layout.to_proto(),
            version=self._state.version,
            finished=self._state.finished,
            lease_seconds=self._lease_seconds,
        )

    async def Pull(self, request: pb.PullRequest, context) -> AsyncIterator[pb.PullFrame]:
        await _check_dtype(context, request.dtype or pb.FLOAT32, "pull")
        version, theta = await self._call(context, self._state.pull, request.worker_id)
        async for frame in self._send_parameters(context, version, theta, request.dtype or pb.FLOAT32):
            yield frame

    async def Push(self, request_iterator, context) -> pb.PushReply:
        result = await self._receive_and_apply(request_iterator, context)
        return _push_reply(result)

    async def PushPull(self, request_iterator, context) -> AsyncIterator[pb.PullFrame]:
        header_holder: list[pb.PushHeader] = []
        result = await self._receive_and_apply(request_iterator, context, header_holder)
        version, theta = await self._call(context, self._state.pull, header_holder[0].worker_id)
        dtype = header_holder[0].pull_dtype or pb.FLOAT32
        async for frame in self._send_parameters(context, version, theta, dtype, push=_push_reply(result)):
            yield frame

    async def Heartbeat(self, request: pb.HeartbeatRequest, context) -> pb.HeartbeatReply:
        finished = await self._call(context, self._state.heartbeat, request.worker_id)
        return pb.HeartbeatReply(finished=finished)

    async def Leave(self, request: pb.LeaveRequest, context) -> pb.LeaveReply:
        await self._call(context, self._state.leave, request.worker_id)
        return pb.LeaveReply()

    async def Status(self, request: pb.StatusRequest, context) -> pb.StatusReply:
        return status_reply(self._state, self._last_eval())

    async def _receive_and_apply(self, request_iterator, context, header_holder: list | None = None) -> PushResult:
        """Checks the header, then receives the gradient and applies it.

        Everything the header alone can refuse (unknown worker, base version, a second push of
        the same worker in flight, the reply's dtype) is refused before a byte of the tensor is
        buffered; the buffer of a refused stream is dropped with it.
        """
        try:
            first = await anext(aiter(request_iterator))
        except StopAsyncIteration:
            self._metrics.push_rejected("malformed")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty push: a push starts with a header")
        started = time.perf_counter()
        if first.WhichOneof("frame") != "header":
            self._metrics.push_rejected("malformed")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a push must start with a header, not a chunk")
        header = first.header
        if header.worker_id in self._pushes_in_flight:
            self._metrics.push_rejected("push_in_flight")
            await context.abort(grpc.StatusCode.ABORTED, str(PushInFlight(header.worker_id)))
        self._pushes_in_flight.add(header.worker_id)
        try:
            await self._call(context, self._state.check_push, header.worker_id, header.base_version, header.seq,
                             on_refusal=self._metrics.push_rejected)
            if header_holder is not None:
                await _check_dtype(context, header.pull_dtype or pb.FLOAT32, "reply")
            grad, received = await self._receive_tensor(header.tensor, request_iterator, context)
            result = await self._call(
                context, self._state.push, header.worker_id, grad,
                base_version=header.base_version, samples=header.samples, loss=header.loss, seq=header.seq,
                on_refusal=functools.partial(self._metrics.push_rejected, received_bytes=received),
            )
        finally:
            self._pushes_in_flight.discard(header.worker_id)
        self._metrics.push_answered(result, time.perf_counter() - started, received)
        if header_holder is not None:
            header_holder.append(header)
        return result

    async def _receive_tensor(self, header: pb.TensorHeader, request_iterator, context) -> tuple[torch.Tensor, int]:
        """The pushed tensor and the bytes received. A stream that stalls between chunks is ended, so
        a worker whose connection died silently mid-push does not keep its push "in progress" forever."""
        frames = aiter(request_iterator)
        received = 0
        try:
            assembler = TensorAssembler(header, expected_numel=self._state.layout.numel)
            while True:
                try:
                    frame = await asyncio.wait_for(anext(frames), self._chunk_timeout)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    self._metrics.push_rejected("stalled", received)
                    await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                        f"push stalled: no chunk for {self._chunk_timeout:g}s; nothing was applied")
                if frame.WhichOneof("frame") != "chunk":
                    raise CodecError("a second header arrived inside a push; expected only chunks")
                received += len(frame.chunk.data)
                assembler.add(frame.chunk)
            return assembler.finish(), received
        except CodecError as error:
            self._metrics.push_rejected(rejection_reason(error), received)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"push rejected: {error}")

    async def _send_parameters(self, context, version: int, theta, dtype: int,
                               push: pb.PushReply | None = None) -> AsyncIterator[pb.PullFrame]:
        try:
            encoded = encode(theta, dtype)
        except (CodecError, ValueError) as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        yield pb.PullFrame(header=pb.PullHeader(version=version, tensor=encoded.header,
                                                finished=self._state.finished, push=push))
        for chunk in chunk_messages(encoded):
            self._metrics.sent(len(chunk.data))
            yield pb.PullFrame(chunk=chunk)


async def _check_dtype(context, dtype: int, what: str) -> None:
    """Refuses an unknown transport dtype before anything happens on its account."""
    try:
        itemsize(dtype)
    except CodecError as error:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{what} dtype: {error}")


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
        held_snapshots=state.held_snapshots(),
        nonfinite_pushes=state.nonfinite_pushes,
    )
