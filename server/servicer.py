"""The gRPC adapter: unpacks requests, calls :class:`ParameterServerState`, packs replies.

No training logic lives here. Every refusal becomes one precise status code with the domain
error's message (:data:`STATUS_CODES`). Calls that take the state's lock run in a thread pool, so
the event loop keeps receiving other workers' gradients meanwhile. Tensors travel as frames of
:mod:`gapaware.common.transport`.

Every call for a worker id presents that worker's secret, checked before anything else. A tensor
transfer, either way, must end within :func:`gapaware.server.limits.transfer_seconds` of its start,
so a peer that stops reading or sending holds a model-sized buffer for a bounded time; Pull and Push
write their replies themselves (``context.write``) to put that deadline around the writes.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch

from gapaware.common.buffers import unpack_buffers
from gapaware.common.layout import ParamLayout
from gapaware.common.results import PushResult
from gapaware.common.transport import (
    MIN_CHUNK_BYTES, Assembler, TransportError, check_header, encode, frame_parser, itemsize, serialize_frame,
    wire_bytes, wire_dtype_of, wire_format,
)
from gapaware.proto import parameter_server_pb2 as pb
from gapaware.proto import parameter_server_pb2_grpc as pb_grpc
from gapaware.server.admission import OneAtATime, PushAdmission
from gapaware.server.errors import (
    BadPush, InvalidJoin, InvalidLayout, LayoutMismatch, NonFiniteUpdate, OversizedGradient, ParametersInFlight,
    PushInFlight, RequestRefused, StaleSnapshot, TooManyWorkers, UnknownWorker, WrongWorkerSecret,
)
from gapaware.server.limits import DEFAULT_CHUNK_TIMEOUT, DEFAULT_MIN_TRANSFER_RATE, transfer_seconds
from gapaware.server.observability import ServerMetrics, rejection_reason
from gapaware.server.push import AdmittedPush
from gapaware.server.refusal import Refused
from gapaware.server.state import ParameterServerState

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ParameterServer"].full_name

READY_FRAME = pb.PullFrame(ready=pb.PushReady()).SerializeToString()
"""Tells a pushing worker that its push is admitted: its chunks may come."""

STATUS_CODES: dict[type[Exception], grpc.StatusCode] = {
    UnknownWorker: grpc.StatusCode.NOT_FOUND,
    LayoutMismatch: grpc.StatusCode.FAILED_PRECONDITION,
    StaleSnapshot: grpc.StatusCode.FAILED_PRECONDITION,
    OversizedGradient: grpc.StatusCode.FAILED_PRECONDITION,   # the bound follows the run: the worker drops it
    NonFiniteUpdate: grpc.StatusCode.FAILED_PRECONDITION,
    BadPush: grpc.StatusCode.INVALID_ARGUMENT,
    TransportError: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidLayout: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidJoin: grpc.StatusCode.INVALID_ARGUMENT,
    PushInFlight: grpc.StatusCode.ABORTED,
    WrongWorkerSecret: grpc.StatusCode.PERMISSION_DENIED,
    TooManyWorkers: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ParametersInFlight: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def status_code_for(error: Exception) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return grpc.StatusCode.INVALID_ARGUMENT


class ParameterServerServicer(pb_grpc.ParameterServerServicer):
    def __init__(self, state: ParameterServerState, *, last_eval: Callable[[], dict] = dict,
                 report: Callable[[int, dict[str, float], str], object] | None = None,
                 lease_seconds: float = 0.0, metrics: ServerMetrics | None = None,
                 chunk_timeout: float = DEFAULT_CHUNK_TIMEOUT,
                 min_transfer_rate: float = DEFAULT_MIN_TRANSFER_RATE) -> None:
        self._state = state
        self._chunk_timeout = chunk_timeout
        self._min_transfer_rate = min_transfer_rate
        self._last_eval = last_eval
        self._report = report  # records an evaluation a worker reports (Evaluator.report)
        self._lease_seconds = lease_seconds
        self._metrics = metrics or ServerMetrics(state)
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="gapaware-update")
        self._admission = PushAdmission(state.model)
        # One transfer of the parameters per worker at a time: each holds a model-sized copy.
        self._sending = OneAtATime(ParametersInFlight)

    async def _call(self, fn: Callable, *args, on_refusal: Callable[[str], None] | None = None):
        """Runs ``fn`` in the pool; a refusal ends the call with its status code (reported to
        ``on_refusal`` by reason first, for the metrics)."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        except (RequestRefused, TransportError) as error:
            self._refuse(error, on_refusal)

    @staticmethod
    def _refuse(error: Exception, on_refusal: Callable[[str], None] | None = None):
        if on_refusal is not None:
            on_refusal(rejection_reason(error))
        raise Refused(status_code_for(error), str(error)) from None

    def _authenticate(self, worker_id: int, secret: bytes, on_refusal: Callable[[str], None] | None = None) -> None:
        """Refuses a call for ``worker_id`` without that worker's secret, before anything else."""
        try:
            self._state.authenticate(worker_id, secret)
        except RequestRefused as error:
            self._refuse(error, on_refusal)

    def _transfer_seconds(self, nbytes: int) -> float:
        return transfer_seconds(nbytes, self._chunk_timeout, self._min_transfer_rate)

    async def Join(self, request: pb.JoinRequest, context) -> pb.JoinReply:
        layout = ParamLayout.from_proto(request.layout) if request.layout.params else None
        record = await self._call(lambda: self._state.join(
            request.hostname or context.peer(), request.device, layout, fingerprint=request.layout.fingerprint,
            run_config_sha256=request.run_config_sha256, observer=request.observer))
        return pb.JoinReply(
            worker_id=record.worker_id,
            run_config_json=self._state.config.to_json(),
            layout=self._state.layout.to_proto(),
            version=self._state.version,
            finished=self._state.finished,
            lease_seconds=self._lease_seconds,
            worker_secret=record.secret,
        )

    async def Pull(self, request: pb.PullRequest, context) -> None:
        self._authenticate(request.worker_id, request.worker_secret)
        dtype = _transport_dtype(request.dtype, "pull")
        try:
            with self._sending.held(request.worker_id):
                await self._send_parameters(context, pb.PullHeader(), request.worker_id, dtype, request.delta_base)
        except ParametersInFlight as error:
            self._refuse(error)

    async def Push(self, request_iterator, context) -> None:
        started = time.perf_counter()
        frames = aiter(request_iterator)
        header = await self._push_header(frames)
        self._authenticate(header.worker_id, header.worker_secret, self._metrics.push_rejected)
        pull_dtype = _transport_dtype(header.pull_dtype, "reply") if header.pull else None
        try:
            nbytes = check_header(header.tensor, numel=self._state.layout.numel, min_chunk_bytes=MIN_CHUNK_BYTES)
        except TransportError as error:
            self._metrics.push_rejected(rejection_reason(error))
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"push rejected: {error}") from None
        await self._call(self._state.check_push, header.worker_id, header.base_version, header.seq,
                         on_refusal=self._metrics.push_rejected)
        try:
            with self._sending.held(header.worker_id) if header.pull else contextlib.nullcontext():
                async with self._admission.admitted(header.worker_id) as buffer:
                    push, received = await self._receive_push(header, nbytes, frames, context, buffer)
                    result = await self._call(self._state.push, push,
                                              on_refusal=lambda reason: self._metrics.push_rejected(reason, received))
                self._metrics.push_answered(result, time.perf_counter() - started, received)
                reply = pb.PullHeader(version=result.version, finished=result.finished, push=_push_reply(result))
                if pull_dtype is None:
                    await self._write_within(context, self._chunk_timeout, [pb.PullFrame(header=reply)])
                else:
                    await self._send_parameters(context, reply, header.worker_id, pull_dtype, header.delta_base)
        except (PushInFlight, ParametersInFlight) as error:
            self._refuse(error, self._metrics.push_rejected)

    async def Heartbeat(self, request: pb.HeartbeatRequest, context) -> pb.HeartbeatReply:
        self._authenticate(request.worker_id, request.worker_secret)
        finished = await self._call(self._state.heartbeat, request.worker_id)
        return pb.HeartbeatReply(finished=finished)

    async def Leave(self, request: pb.LeaveRequest, context) -> pb.LeaveReply:
        self._authenticate(request.worker_id, request.worker_secret)
        await self._call(self._state.leave, request.worker_id)
        if request.run_finished and self._state.shard.index > 0:
            self._state.finish()
        return pb.LeaveReply()

    async def Status(self, request: pb.StatusRequest, context) -> pb.StatusReply:
        return status_reply(self._state, self._last_eval())

    async def Report(self, request: pb.ReportRequest, context) -> pb.ReportReply:
        self._authenticate(request.worker_id, request.worker_secret)
        if self._report is None:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, "this server records no reported evaluations")
        await self._call(self._report, request.version, dict(request.metrics), request.error)
        return pb.ReportReply()

    async def _push_header(self, frames: AsyncIterator) -> pb.PushHeader:
        try:
            header = await anext(frames)
        except StopAsyncIteration:
            header = None
        if not isinstance(header, pb.PushHeader):
            self._metrics.push_rejected("malformed")
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          "a push must start with a header" + ("" if header is None else ", not a chunk"))
        return header

    async def _receive_push(self, header: pb.PushHeader, nbytes: int, frames: AsyncIterator, context,
                            buffer: torch.Tensor) -> tuple[AdmittedPush, int]:
        """The pushed gradient, received into ``buffer`` and checked, and the bytes received: the ready
        frame goes out, then the chunks come. A stream that stalls between chunks is ended, so a worker
        whose connection died silently mid-push does not keep its push in progress for ever; one that
        trickles in is ended at its transfer deadline, so no push holds a gradient slot longer."""
        received = 0
        seconds = self._transfer_seconds(nbytes)
        try:
            assembler = Assembler(header.tensor, numel=self._state.layout.numel, out=buffer, check_finite=True,
                                  min_chunk_bytes=MIN_CHUNK_BYTES)
            async with asyncio.timeout(seconds):
                await context.write(READY_FRAME)
                while True:
                    try:
                        async with asyncio.timeout(self._chunk_timeout):
                            frame = await anext(frames)
                    except StopAsyncIteration:
                        break
                    except TimeoutError:
                        self._metrics.push_rejected("stalled", received)
                        raise Refused(grpc.StatusCode.DEADLINE_EXCEEDED, f"push stalled: no chunk for "
                                      f"{self._chunk_timeout:g}s; nothing was applied") from None
                    assembler.add(frame)
                    received += len(frame.data)
            grad = assembler.finish()
            unpack_buffers(header.buffers, header.buffers_crc32c, self._state.layout.buffers)
            return self._state.admit(header.worker_id, grad, base_version=header.base_version, seq=header.seq,
                                     samples=header.samples, loss=header.loss, finite=assembler.finite,
                                     buffers=header.buffers if self._state.layout.buffers else None,
                                     buffers_crc32c=header.buffers_crc32c), received
        except TimeoutError:
            self._metrics.push_rejected("too_slow", received)
            raise Refused(grpc.StatusCode.DEADLINE_EXCEEDED,
                          f"push too slow: {received} of its {nbytes} bytes arrived in {seconds:.1f}s, the "
                          f"--chunk-timeout plus the bytes at --min-transfer-rate {self._min_transfer_rate:g} MiB/s; "
                          "nothing was applied") from None
        except (TransportError, BadPush) as error:
            self._metrics.push_rejected(rejection_reason(error), received)
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"push rejected: {error}") from None

    async def _send_parameters(self, context, header: pb.PullHeader, worker_id: int, dtype: int,
                               delta_base: int) -> None:
        """Sends what ``worker_id`` is to be sent now: ``header`` (its version set here) with the tensor's,
        then its chunks, each framed as gRPC takes it. In an 8-bit ``dtype`` that is a delta to the
        parameters ``delta_base`` names, or a full float32 pull (:meth:`ModelStore.delta_pull`). Once the
        call is over nothing reads the sent tensor: a reusable one is then a spare."""
        version, parameters = await self._call(self._state.pull_to_send, worker_id, wire_format(dtype), delta_base)
        try:
            tensor_header, chunks = encode(parameters.tensor, wire_dtype_of(parameters.tensor))
            header.version = version
            header.tensor.CopyFrom(tensor_header)
            header.delta, header.delta_id = parameters.delta, parameters.delta_id
            header.finished = header.finished or self._state.finished
            header.buffers, header.buffers_crc32c = self._state.buffers()
            nbytes = wire_bytes(tensor_header.dtype, tensor_header.numel)
            await self._write_within(context, self._transfer_seconds(nbytes),
                                     itertools.chain([pb.PullFrame(header=header)], chunks))
            self._metrics.sent(nbytes)
        finally:
            if parameters.reusable:
                self._state.model.recycle(parameters.tensor)

    async def _write_within(self, context, seconds: float, frames: Iterable[pb.PullFrame | bytes]) -> None:
        """Writes ``frames`` (taken one at a time), all within ``seconds``: a client that stops reading
        is cut off at the deadline rather than holding what is being sent to it.

        A status cannot follow a write that is still waiting for the client's flow-control window
        (gRPC refuses the batch), so the call is ended as a cancelled one: its handler lets go of the
        tensor now, and gRPC keeps the one frame it holds until the client's own deadline, or the
        connection's age (:data:`gapaware.server.limits.CONNECTION_AGE_SECONDS`), ends the stream."""
        try:
            async with asyncio.timeout(seconds):
                for frame in frames:
                    await context.write(frame)
        except TimeoutError:
            self._metrics.send_ended()
            raise asyncio.CancelledError(f"the reply was not taken within {seconds:.1f}s") from None


def add_to_server(servicer: ParameterServerServicer, server: grpc.aio.Server) -> None:
    """Registers ``servicer`` like the generated ``add_ParameterServerServicer_to_server``, except that
    tensor frames are (de)serialized by :mod:`gapaware.common.transport`: the same bytes on the wire
    as protobuf's, without a message object per chunk. A method added to the .proto needs an entry here."""
    unary = {
        "Join": (pb.JoinRequest, pb.JoinReply), "Heartbeat": (pb.HeartbeatRequest, pb.HeartbeatReply),
        "Leave": (pb.LeaveRequest, pb.LeaveReply), "Status": (pb.StatusRequest, pb.StatusReply),
        "Report": (pb.ReportRequest, pb.ReportReply),
    }
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(getattr(servicer, name), request_deserializer=request.FromString,
                                                  response_serializer=reply.SerializeToString)
        for name, (request, reply) in unary.items()
    }
    handlers["Pull"] = grpc.unary_stream_rpc_method_handler(
        servicer.Pull, request_deserializer=pb.PullRequest.FromString, response_serializer=serialize_frame)
    handlers["Push"] = grpc.stream_stream_rpc_method_handler(
        servicer.Push, request_deserializer=frame_parser(pb.PushFrame), response_serializer=serialize_frame)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def _transport_dtype(dtype: int, what: str) -> int:
    """The transport dtype a request names (FLOAT32 when unspecified); an unknown one is refused
    before anything happens on its account."""
    dtype = dtype or pb.FLOAT32
    try:
        itemsize(dtype)
    except TransportError as error:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{what} dtype: {error}") from None
    return dtype


def _push_reply(result: PushResult) -> pb.PushReply:
    return pb.PushReply(version=result.version, staleness=result.staleness, mean_gap=result.mean_gap,
                        finished=result.finished, applied=result.applied)


def status_reply(state: ParameterServerState, last_eval: dict) -> pb.StatusReply:
    now = time.monotonic()
    totals = state.totals()
    health = state.checkpoint_health
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
        oversized_pushes=state.updater.oversized_pushes, nonfinite_updates=state.updater.nonfinite_updates,
        grad_norm_limit=state.grad_norm_limit(),
        checkpoint_failures=health.failures, last_checkpoint_error=health.last_error,
        checkpoint_version=health.version,
        last_metrics={name: float(last_eval[name]) for name in last_eval.get("eval_metrics", ())
                      if isinstance(last_eval.get(name), (int, float))},
        eval_errors=last_eval.get("eval_errors", 0), last_eval_error=last_eval.get("eval_error", ""),
        evals_skipped=last_eval.get("evals_skipped", 0),
        shard_index=state.shard.index, shard_count=state.shard.count, parameters=state.layout.numel,
    )
