"""The gRPC adapter: unpacks requests, calls :class:`ParameterServerState`, packs replies.

No training logic lives here. Every refusal becomes one precise status code with the
domain error's message; the slow, lock-holding calls run in a thread pool so the event
loop keeps receiving other workers' gradients meanwhile. Tensor chunks are (de)serialized
by :mod:`gapaware.common.wire` (see :func:`add_to_server`): the same bytes on the wire as
protobuf's, without a message object per chunk.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import torch

from gapaware.common.codec import (
    MAX_CHUNK_BYTES, TORCH_DTYPES, CodecError, EncodedTensor, TensorAssembler, encode_to_send, itemsize,
    tensor_bytes,
)
from gapaware.common.layout import ParamLayout
from gapaware.common.results import PushResult
from gapaware.common.wire import (
    ChunkView, WholeTensor, chunk_frame, chunk_frames, frame_parser, serialize_frame, whole_message, whole_parser,
)
from gapaware.proto import parameter_server_pb2 as pb
from gapaware.proto import parameter_server_pb2_grpc as pb_grpc
from gapaware.server.errors import (
    BadPush, InvalidLayout, LayoutMismatch, PushInFlight, RequestRefused, StaleSnapshot, UnknownWorker,
)
from gapaware.server.observability import ServerMetrics, rejection_reason
from gapaware.server.sent import Loan
from gapaware.server.state import ParameterServerState, all_finite

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ParameterServer"].full_name
GRADIENTS_IN_MEMORY = 2
"""Pushes received and applied at once: one is applied while the next arrives. Each holds a
model-sized buffer from its admission on, so a burst of N workers pushing together would otherwise
hold N more copies of the model. The others wait: a PushPull that asked for a ready frame sends no
chunk until it is admitted; any other stream's bytes wait in gRPC's buffers, up to a receive window."""

READY_FRAME = pb.PullFrame(ready=pb.PushReady()).SerializeToString()
"""Tells a worker that asked with ``PushHeader.await_ready`` to send its gradient's chunks: until
then they wait at the worker, not in the server's gRPC buffers (up to a receive window each)."""

STATUS_CODES: dict[type[Exception], grpc.StatusCode] = {
    UnknownWorker: grpc.StatusCode.NOT_FOUND,
    LayoutMismatch: grpc.StatusCode.FAILED_PRECONDITION,
    StaleSnapshot: grpc.StatusCode.FAILED_PRECONDITION,
    BadPush: grpc.StatusCode.INVALID_ARGUMENT,
    CodecError: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidLayout: grpc.StatusCode.INVALID_ARGUMENT,
    PushInFlight: grpc.StatusCode.ABORTED,
}


@dataclass(frozen=True, slots=True)
class Gradient:
    """A received gradient, whether all its elements are finite (checked as it arrived), and whether
    it is in the push's own buffer, which the update may overwrite (not read where it arrived)."""

    values: torch.Tensor
    finite: bool
    spare: bool


@dataclass(frozen=True, slots=True)
class Admission:
    """An admitted push's gradient buffer, and when its header arrived (for the update latency)."""

    buffer: torch.Tensor
    started: float


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
        self._gradient_slots = asyncio.Semaphore(GRADIENTS_IN_MEMORY)

    async def _call(self, context: grpc.aio.ServicerContext, fn: Callable, *args,
                    on_refusal: Callable[[str], None] | None = None, inline: bool = False, **kwargs):
        """Runs ``fn`` in the pool, or with ``inline`` on the event loop; a refusal aborts the RPC with
        its status code (and is reported to ``on_refusal`` by reason first, for the metrics).

        Inline is for the work of a whole-message call: at most 4 MiB in the transport dtype, whose
        update and copy take about as long as the two thread hand-offs to and from the pool, and
        whose round trips are latency-bound (1 MiB push-and-pull, 4 and 16 workers: 10-25% more
        round trips a second inline)."""
        try:
            if inline:
                return fn(*args, **kwargs)
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
            sends_ready=True,
        )

    async def Pull(self, request: pb.PullRequest, context) -> AsyncIterator[pb.PullFrame | bytes]:
        await _check_dtype(context, request.dtype or pb.FLOAT32, "pull")
        version, encoded, loan = await self._call(context, self._pull_encoded, request.worker_id,
                                                  request.dtype or pb.FLOAT32)
        async for frame in self._send_parameters(version, encoded, loan):
            yield frame

    async def Push(self, request_iterator, context) -> pb.PushReply:
        header, frames = await self._push_header(request_iterator, context)
        async with self._admitted(header, context) as admission:
            (result,) = await self._apply_gradient(header, context, admission, self._apply_push, frames=frames)
        return _push_reply(result)

    async def PushPull(self, request_iterator, context) -> AsyncIterator[pb.PullFrame | bytes]:
        header, frames = await self._push_header(request_iterator, context, reply=True)
        async with self._admitted(header, context) as admission:
            if header.await_ready:
                yield READY_FRAME
            result, version, encoded, loan = await self._apply_gradient(header, context, admission,
                                                                        self._push_then_pull, frames=frames)
        async for frame in self._send_parameters(version, encoded, loan, push=_push_reply(result)):
            yield frame

    async def PullWhole(self, request: pb.PullRequest, context) -> bytes:
        dtype = request.dtype or pb.FLOAT32
        await self._check_one_message(context, dtype, "pull")
        return await self._call(context, self._pull_whole, request.worker_id, dtype, inline=True)

    async def PushPullWhole(self, request: WholeTensor, context) -> bytes:
        header = request.header
        await self._check_one_message(context, header.pull_dtype or pb.FLOAT32, "reply")
        async with self._admitted(header, context, whole=True) as admission:
            _, reply = await self._apply_gradient(header, context, admission, self._push_then_pull_whole,
                                                  frames=_one(ChunkView(0, request.data)), whole=True)
        return reply

    async def Heartbeat(self, request: pb.HeartbeatRequest, context) -> pb.HeartbeatReply:
        finished = await self._call(context, self._state.heartbeat, request.worker_id)
        return pb.HeartbeatReply(finished=finished)

    async def Leave(self, request: pb.LeaveRequest, context) -> pb.LeaveReply:
        await self._call(context, self._state.leave, request.worker_id)
        return pb.LeaveReply()

    async def Status(self, request: pb.StatusRequest, context) -> pb.StatusReply:
        return status_reply(self._state, self._last_eval())

    async def _push_header(self, request_iterator, context, reply: bool = False) -> tuple[pb.PushHeader, AsyncIterator]:
        """The header of a pushed stream, and the stream's frames after it; with ``reply``, the
        reply's dtype is checked too. Everything the header alone can refuse is refused before a
        byte of the tensor is buffered (see :meth:`_admitted`)."""
        frames = aiter(request_iterator)
        try:
            header = await anext(frames)
        except StopAsyncIteration:
            self._metrics.push_rejected("malformed")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty push: a push starts with a header")
        if not isinstance(header, pb.PushHeader):
            self._metrics.push_rejected("malformed")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a push must start with a header, not a chunk")
        if reply:
            await _check_dtype(context, header.pull_dtype or pb.FLOAT32, "reply")
        return header, frames

    @contextlib.asynccontextmanager
    async def _admitted(self, header: pb.PushHeader, context, *, whole: bool = False) -> AsyncIterator[Admission]:
        """Admits a push: gives it a model-sized buffer to receive its gradient into, once one of the
        :data:`GRADIENTS_IN_MEMORY` is free, and takes the buffer back for the next push when the
        block ends without an error.

        A second push of the same worker in flight is refused first; a stream is then refused for
        what its header alone can refuse (unknown worker, base version), before any of its bytes is
        received; a ``whole`` message has arrived already and is checked all at once when applied."""
        started = time.perf_counter()
        if header.worker_id in self._pushes_in_flight:
            self._metrics.push_rejected("push_in_flight")
            await context.abort(grpc.StatusCode.ABORTED, str(PushInFlight(header.worker_id)))
        self._pushes_in_flight.add(header.worker_id)
        try:
            if not whole:
                await self._call(context, self._state.check_push, header.worker_id, header.base_version, header.seq,
                                 on_refusal=self._metrics.push_rejected)
            async with self._gradient_slots:
                # A spare of the server's model-sized tensors, reused push after push: a fresh one per
                # push costs a page fault and the kernel's zeroing on each of its pages.
                buffer = self._state.gradient_buffer()
                yield Admission(buffer, started)
                # Only now, once the pool thread is done with it: a cancelled call leaves the update
                # running, and a refused one is rare enough to allocate anew.
                self._state.recycle(buffer)
        finally:
            self._pushes_in_flight.discard(header.worker_id)

    async def _apply_gradient(self, header: pb.PushHeader, context, admission: Admission, apply: Callable, *,
                              frames: AsyncIterator, whole: bool = False):
        """Receives the gradient from ``frames`` into the admission's buffer, then runs
        ``apply(header, grad)`` and returns what it returned: a tuple whose first element is the
        push's result. A stream is applied in the pool; a ``whole`` message on the event loop (see
        :meth:`_call`), and its float32 bytes are read where they arrived."""
        grad, received = await self._receive_tensor(header.tensor, frames, context, admission.buffer, borrow=whole)
        outcome = await self._call(
            context, apply, header, grad, inline=whole,
            on_refusal=functools.partial(self._metrics.push_rejected, received_bytes=received))
        self._metrics.push_answered(outcome[0], time.perf_counter() - admission.started, received)
        return outcome

    async def _receive_tensor(self, header: pb.TensorHeader, frames: AsyncIterator, context,
                              out: torch.Tensor, *, borrow: bool = False) -> tuple[Gradient, int]:
        """The pushed tensor (in ``out``, or with ``borrow`` read where it arrived when it is float32
        in one chunk), whether it is free of NaN and Inf, and the bytes received.

        Each chunk's elements are checked for NaN and Inf as they arrive, while they are in cache,
        instead of in a pass over the whole gradient before the update. A stream that stalls between
        chunks is ended, so a worker whose connection died silently mid-push does not keep its push
        "in progress" forever."""
        received = 0
        finite, checked = True, 0
        try:
            assembler = TensorAssembler(header, expected_numel=self._state.layout.numel, out=out, borrow=borrow)
            while True:
                try:
                    async with asyncio.timeout(self._chunk_timeout):
                        frame = await anext(frames)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    self._metrics.push_rejected("stalled", received)
                    await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                        f"push stalled: no chunk for {self._chunk_timeout:g}s; nothing was applied")
                if isinstance(frame, pb.TensorTrailer):
                    assembler.add_trailer(frame)
                    continue
                if not isinstance(frame, ChunkView):
                    what = "a second header" if isinstance(frame, pb.PushHeader) else "a frame with no header, chunk or trailer"
                    raise CodecError(f"{what} arrived inside a push; expected only chunks and a trailer")
                received += len(frame.data)
                assembler.add(frame)
                finite = finite and all_finite(assembler.tensor[checked:assembler.elements])
                checked = assembler.elements
            values = assembler.finish()
            return Gradient(values, finite, spare=values is out), received
        except CodecError as error:
            self._metrics.push_rejected(rejection_reason(error), received)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"push rejected: {error}")

    # The methods below up to _check_one_message run in the pool for a stream: the update and any
    # cast of the parameters stay off the event loop, in one thread hop per call, and the stream's
    # checksum is computed chunk by chunk as the chunks are framed for gRPC, while each is in cache.
    # For a whole message (at most 4 MiB) they run on the event loop (see _call).
    def _apply_push(self, header: pb.PushHeader, grad: Gradient) -> tuple[PushResult]:
        return (self._state.push(header.worker_id, grad.values, base_version=header.base_version,
                                 samples=header.samples, loss=header.loss, seq=header.seq, finite=grad.finite,
                                 spare_grad=grad.spare),)

    def _pull_encoded(self, worker_id: int, dtype: int) -> tuple[int, EncodedTensor, Loan]:
        """The version, the stream's header and chunk layout for the parameters in ``dtype``, and the
        loan to read the chunks from as they are sent (:meth:`_send_parameters` gives it back)."""
        version, loan = self._state.pull(worker_id, lend=True, dtype=TORCH_DTYPES[dtype])
        return version, loan.read(functools.partial(encode_to_send, dtype=dtype, whole=False)), loan

    def _push_then_pull(self, header: pb.PushHeader, grad: Gradient) -> tuple[PushResult, int, EncodedTensor, Loan]:
        (result,) = self._apply_push(header, grad)
        return (result, *self._pull_encoded(header.worker_id, header.pull_dtype or pb.FLOAT32))

    def _pull_whole(self, worker_id: int, dtype: int, push: pb.PushReply | None = None) -> bytes:
        """A serialized ``WholePull``: the parameters in one chunk (the caller checked they fit)."""
        version, loan = self._state.pull(worker_id, lend=True, dtype=TORCH_DTYPES[dtype])
        try:
            reply = loan.read(functools.partial(self._whole_pull, version, dtype, push))
        finally:
            self._state.give_back(loan)
        self._metrics.sent(self._state.layout.numel * itemsize(dtype))
        return reply

    def _whole_pull(self, version: int, dtype: int, push: pb.PushReply | None, parameters: torch.Tensor) -> bytes:
        encoded = encode_to_send(parameters, dtype, whole=True)
        (chunk,) = encoded.chunks
        return whole_message(pb.PullHeader(version=version, tensor=encoded.header, finished=self._state.finished,
                                           push=push), chunk)

    def _push_then_pull_whole(self, header: pb.PushHeader, grad: Gradient) -> tuple[PushResult, bytes]:
        (result,) = self._apply_push(header, grad)
        return result, self._pull_whole(header.worker_id, header.pull_dtype or pb.FLOAT32, _push_reply(result))

    async def _check_one_message(self, context, dtype: int, what: str) -> None:
        """Refuses a whole-message call whose tensor does not fit one chunk, before anything happens."""
        await _check_dtype(context, dtype, what)
        nbytes = self._state.layout.numel * itemsize(dtype)
        if nbytes > MAX_CHUNK_BYTES:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the model takes {nbytes} bytes in the {what} dtype, more than the {MAX_CHUNK_BYTES} "
                                "one message carries: use the streaming Pull or PushPull")

    async def _send_parameters(self, version: int, encoded: EncodedTensor, loan: Loan,
                               push: pb.PushReply | None = None) -> AsyncIterator[pb.PullFrame | bytes]:
        """The reply's frames; each chunk is copied from ``loan`` into its frame as gRPC takes it.
        Once the last is taken, or the call ends, the loan is given back: nothing reads it after the
        generator, as the frames are copies."""
        def frame(index: int, start: int, stop: int) -> bytes:
            return loan.read(lambda parameters: chunk_frame(index, tensor_bytes(parameters)[start:stop]))

        try:
            yield pb.PullFrame(header=pb.PullHeader(version=version, tensor=encoded.header,
                                                    finished=self._state.finished, push=push))
            frames = chunk_frames(encoded, frame)
            for chunk in encoded.chunks:
                await loan.readable()  # an update may be writing the old θ into what the loan reads
                self._metrics.sent(len(chunk))
                yield next(frames)
            for trailer in frames:
                yield trailer
        finally:
            self._state.give_back(loan)


def add_to_server(servicer: ParameterServerServicer, server: grpc.aio.Server) -> None:
    """Registers ``servicer`` like the generated ``add_ParameterServerServicer_to_server``, except
    that tensor frames are (de)serialized by :mod:`gapaware.common.wire`: chunks skip message
    objects, with the same bytes on the wire. A method added to the .proto needs an entry here."""
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
    handlers["PullWhole"] = grpc.unary_unary_rpc_method_handler(
        servicer.PullWhole, request_deserializer=pb.PullRequest.FromString, response_serializer=serialize_frame)
    handlers["PushPullWhole"] = grpc.unary_unary_rpc_method_handler(
        servicer.PushPullWhole, request_deserializer=whole_parser(pb.WholePush, pb.PushHeader),
        response_serializer=serialize_frame)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


async def _check_dtype(context, dtype: int, what: str) -> None:
    """Refuses an unknown transport dtype before anything happens on its account."""
    try:
        itemsize(dtype)
    except CodecError as error:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{what} dtype: {error}")


async def _one(item) -> AsyncIterator:
    yield item


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
