"""The worker side of the wire contract: join, pull, push, leave.

:class:`WorkerClient` is the public Python API; the training loop in
:mod:`gapaware.worker.loop` is built on it, and users can drive training with it
themselves.
"""
from __future__ import annotations

import contextlib
import math
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch

from gapaware.common.codec import (
    DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES, TORCH_DTYPES, CodecError, EncodedTensor, TensorAssembler, dtype_from_name,
    encode_to_send, itemsize,
)
from gapaware.common.config import RunConfig
from gapaware.common.layout import ParamLayout
from gapaware.common.results import PushResult
from gapaware.common.security import ClientSecurity
from gapaware.proto import parameter_server_pb2 as pb
from gapaware.common.wire import (
    ChunkView, WholeTensor, chunk_frames, frame_parser, serialize_frame, whole_message, whole_parser,
)
from gapaware.proto import parameter_server_pb2_grpc as pb_grpc

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
    ("grpc.max_send_message_length", 8 * 1024 * 1024),
    # The retry policy above the client paces the calls (--retry-max-backoff); the channel must be
    # connected by the time a retry comes, or the retry fails fast and a restarted server is
    # reached one backoff later. So the channel tries to connect at least once a second (gRPC's
    # default backs off up to 2 minutes) and gives each attempt 5 s, enough for a TLS handshake
    # across continents ("min_reconnect_backoff" is the connect timeout: gRPC's
    # doc/connection-backoff.md, MIN_CONNECT_TIMEOUT).
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.min_reconnect_backoff_ms", 5000),
]


@dataclass(frozen=True)
class JoinInfo:
    worker_id: int
    config: RunConfig
    layout: ParamLayout
    version: int
    finished: bool
    lease_seconds: float
    sends_ready: bool = False
    """The server answers ``await_ready`` (see :meth:`WorkerClient.push_pull`)."""


class WorkerClient:
    """A connection to one parameter server, as one worker.

    ``transport_dtype`` ("float32", "bfloat16" or "float16") is how gradients are sent
    and parameters requested; tensors handed to and returned by this class are always
    flat float32 CPU tensors.

    Security (see :mod:`gapaware.common.security`): ``tls_ca`` (a PEM file) turns on TLS and
    names the CA that signed the server's certificate; ``tls_cert``/``tls_key`` are this
    client's certificate for a server that requires mutual TLS; ``token`` is the shared
    secret (``load_token()`` reads it from ``GAPAWARE_TOKEN`` or a file).

    A model of at most ``one_message_bytes`` (4 MiB, the most one chunk holds) in the transport
    dtype travels in one unary call each way (``PullWhole``, ``PushPullWhole``): a streaming call
    costs several times a unary one, which decides the speed of small models. 0 always streams.
    """

    def __init__(self, address: str, *, transport_dtype: str = "float32",
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, timeout: float = 120.0,
                 tls_ca: str | Path | None = None, tls_cert: str | Path | None = None,
                 tls_key: str | Path | None = None, token: str | None = None,
                 one_message_bytes: int = MAX_CHUNK_BYTES) -> None:
        if not 0 <= one_message_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"Invalid one_message_bytes: {one_message_bytes} (0 to {MAX_CHUNK_BYTES})")
        self.address = address
        self._dtype = dtype_from_name(transport_dtype)
        self._chunk_bytes = chunk_bytes
        self._one_message_bytes = one_message_bytes
        self._timeout = timeout
        security = ClientSecurity(tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, token=token)
        self._channel: grpc.Channel = security.open_channel(address, CHANNEL_OPTIONS)
        self._stub = pb_grpc.ParameterServerStub(self._channel)
        # The tensor-carrying methods skip protobuf message objects for chunks (gapaware.common.wire).
        method = "/gapaware.v1.ParameterServer/"
        parse_pull = frame_parser(pb.PullFrame)
        self._pull_frames = self._channel.unary_stream(
            method + "Pull", request_serializer=pb.PullRequest.SerializeToString,
            response_deserializer=parse_pull, _registered_method=True)
        self._push_stream = self._channel.stream_unary(
            method + "Push", request_serializer=serialize_frame,
            response_deserializer=pb.PushReply.FromString, _registered_method=True)
        self._push_pull_frames = self._channel.stream_stream(
            method + "PushPull", request_serializer=serialize_frame, response_deserializer=parse_pull,
            _registered_method=True)
        parse_whole = whole_parser(pb.WholePull, pb.PullHeader)
        self._pull_whole = self._channel.unary_unary(
            method + "PullWhole", request_serializer=pb.PullRequest.SerializeToString,
            response_deserializer=parse_whole, _registered_method=True)
        self._push_pull_whole = self._channel.unary_unary(
            method + "PushPullWhole", request_serializer=serialize_frame, response_deserializer=parse_whole,
            _registered_method=True)
        self._info: JoinInfo | None = None
        self._seq = 0
        self._spare_cast: torch.Tensor | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def join(self, layout: ParamLayout | None = None, *, device: str = "cpu") -> JoinInfo:
        """Registers with the server. With ``layout`` the server checks the model matches."""
        reply = self._stub.Join(
            pb.JoinRequest(layout=layout.to_proto() if layout else None, hostname=socket.gethostname(),
                           device=device),
            timeout=self._timeout,
        )
        self._info = JoinInfo(
            worker_id=reply.worker_id, config=RunConfig.from_json(reply.run_config_json),
            layout=ParamLayout.from_proto(reply.layout), version=reply.version, finished=reply.finished,
            lease_seconds=reply.lease_seconds, sends_ready=reply.sends_ready,
        )
        return self._info

    @property
    def info(self) -> JoinInfo:
        if self._info is None:
            raise RuntimeError("join() first: the server assigns the worker id at Join")
        return self._info

    def leave(self) -> None:
        self._stub.Leave(pb.LeaveRequest(worker_id=self.info.worker_id), timeout=self._timeout)
        self._info = None

    def heartbeat(self, timeout: float | None = None) -> bool:
        """Keeps the lease alive; returns True once the run is finished."""
        return self._stub.Heartbeat(pb.HeartbeatRequest(worker_id=self.info.worker_id),
                                    timeout=timeout or self._timeout).finished

    def status(self) -> pb.StatusReply:
        return self._stub.Status(pb.StatusRequest(), timeout=self._timeout)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> WorkerClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- parameters and gradients ---------------------------------------------------------
    def pull(self, *, out: torch.Tensor | None = None) -> tuple[int, torch.Tensor]:
        """The server's current version and parameters (flat float32).

        ``out``: a flat float32 tensor of the model's size to receive the parameters into, returned
        as the parameters. A training loop that passes the same one every step saves a model-sized
        allocation per step (fresh memory costs the kernel a page fault and zeroing per page). A
        call that fails leaves it partly overwritten. None allocates a new tensor.
        """
        request = pb.PullRequest(worker_id=self.info.worker_id, dtype=self._dtype)
        if self._one_message():
            header, theta = self._receive_whole(self._pull_whole(request, timeout=self._timeout), out)
        else:
            header, theta = self._receive(self._pull_frames(request, timeout=self._timeout), out)
        return header.version, theta

    def next_seq(self) -> int:
        """A new push sequence number: pass it as ``seq`` to every attempt of one push."""
        self._seq += 1
        return self._seq

    def push(self, grad: torch.Tensor, base_version: int, *, samples: int = 0,
             loss: float = math.nan, seq: int | None = None) -> PushResult:
        """Sends a gradient computed on the parameters of ``base_version``.

        ``seq`` numbers the push for exactly-once delivery: retrying a push whose reply was lost
        with the same ``seq`` is applied at most once (the copy is answered with ``applied=False``).
        None takes :meth:`next_seq`.

        Unlike :meth:`push_pull`, a push cannot wait for its turn: the server answers it only at its
        end, so while it waits its chunks fill a receive window in the server's memory.
        """
        with self._cast_buffer() as cast:
            reply = self._push_stream(self._push_frames(grad, base_version, samples, loss, seq, cast),
                                      timeout=self._timeout)
        return _result(reply)

    def push_pull(self, grad: torch.Tensor, base_version: int, *, samples: int = 0,
                  loss: float = math.nan, seq: int | None = None,
                  out: torch.Tensor | None = None) -> tuple[PushResult, int, torch.Tensor]:
        """Push, then receive the parameters after the update: one round trip a step. ``seq`` as in
        :meth:`push`; a retried copy still receives the current parameters; ``out`` as in :meth:`pull`.

        A streamed push sends its header, then waits for the server's ready frame before its chunks
        (when the server offers it at Join): a push that waits for the server holds no bytes there."""
        with self._cast_buffer() as cast:
            if self._one_message():
                header, encoded = self._push_parts(grad, base_version, samples, loss, seq, cast, whole=True)
                (chunk,) = encoded.chunks
                reply = self._push_pull_whole(whole_message(header, chunk), timeout=self._timeout)
                header, theta = self._receive_whole(reply, out)
            else:
                admission = _Admission() if self.info.sends_ready else None
                frames = self._push_pull_frames(
                    self._push_frames(grad, base_version, samples, loss, seq, cast, admission), timeout=self._timeout)
                header, theta = self._receive(frames, out, admission)
        return _result(header.push), header.version, theta

    @contextlib.contextmanager
    def _cast_buffer(self) -> Iterator[torch.Tensor | None]:
        """The tensor a gradient is cast into for a reduced transport dtype (None in float32), reused
        push after push: a fresh one costs page faults on every step. It is kept for the next push
        only when this one succeeded: after a failure gRPC may still be reading it."""
        if self._dtype == pb.FLOAT32:
            yield None
            return
        cast, self._spare_cast = self._spare_cast, None
        if cast is None or cast.numel() != self.info.layout.numel:
            cast = torch.empty(self.info.layout.numel, dtype=TORCH_DTYPES[self._dtype])
        yield cast
        self._spare_cast = cast

    def _one_message(self) -> bool:
        """Whether the model travels whole: at most ``one_message_bytes`` in the transport dtype."""
        return self.info.layout.numel * itemsize(self._dtype) <= self._one_message_bytes

    def _push_frames(self, grad: torch.Tensor, base_version: int, samples: int, loss: float, seq: int | None,
                     cast: torch.Tensor | None, admission: _Admission | None = None) -> Iterator[pb.PushFrame | bytes]:
        """The push's frames; with ``admission``, the header asks for a ready frame and the chunks
        follow only once it came (gRPC takes them in a thread of its own, so waiting here blocks
        only this call's sending)."""
        header, encoded = self._push_parts(grad, base_version, samples, loss, seq, cast)
        header.await_ready = admission is not None
        yield pb.PushFrame(header=header)
        if admission is None or admission.wait(self._timeout):
            yield from chunk_frames(encoded)

    def _push_parts(self, grad: torch.Tensor, base_version: int, samples: int, loss: float, seq: int | None,
                    cast: torch.Tensor | None, *, whole: bool = False) -> tuple[pb.PushHeader, EncodedTensor]:
        """The push's header and its encoded gradient (chunks that view ``grad``, or ``cast`` holding
        it in the transport dtype), framed as one message when ``whole`` (see :func:`encode_to_send`)."""
        if grad.dim() != 1 or grad.numel() != self.info.layout.numel:
            raise ValueError(f"gradient must be flat with {self.info.layout.numel} elements, "
                             f"got shape {tuple(grad.shape)}")
        seq = self.next_seq() if seq is None else seq
        encoded = encode_to_send(grad, self._dtype, whole=whole, chunk_bytes=self._chunk_bytes, cast_into=cast)
        return pb.PushHeader(worker_id=self.info.worker_id, base_version=base_version, seq=seq, samples=samples,
                             loss=loss, tensor=encoded.header, pull_dtype=self._dtype), encoded

    def _receive(self, frames, out: torch.Tensor | None,
                 admission: _Admission | None = None) -> tuple[pb.PullHeader, torch.Tensor]:
        """The reply's header and tensor; with ``admission``, the reply starts with the ready frame,
        which lets the push's chunks go, and a reply that fails before it lets the sender give up."""
        frames = iter(frames)
        try:
            if admission is not None:
                if not isinstance(next(frames, None), pb.PushReady):
                    raise CodecError("the server's reply did not start with the ready frame the push asked for")
                admission.admit()
            header = next(frames, None)
            if not isinstance(header, pb.PullHeader):
                raise CodecError("the server's reply did not start with a header")
            assembler = TensorAssembler(header.tensor, expected_numel=self.info.layout.numel, out=out)
            for frame in frames:
                if isinstance(frame, ChunkView):
                    assembler.add(frame)
                elif isinstance(frame, pb.TensorTrailer):
                    assembler.add_trailer(frame)
                else:
                    raise CodecError("the server's reply held a frame other than a chunk or a trailer after its header")
            return header, assembler.finish()
        finally:
            if admission is not None:
                admission.end()

    def _receive_whole(self, reply: WholeTensor, out: torch.Tensor | None) -> tuple[pb.PullHeader, torch.Tensor]:
        """A whole reply is a stream of one header and one chunk: :meth:`_receive` checks it alike."""
        return self._receive((reply.header, ChunkView(0, reply.data)), out)


class _Admission:
    """Whether a push's chunks may go: set by the reading thread when the server's ready frame
    arrives, or when the call ended without it (then they never go)."""

    def __init__(self) -> None:
        self._decided = threading.Event()
        self._admitted = False

    def admit(self) -> None:
        self._admitted = True
        self._decided.set()

    def end(self) -> None:
        self._decided.set()

    def wait(self, timeout: float) -> bool:
        """Whether the chunks may go, once that is decided (False after ``timeout``: the call's
        deadline has passed by then)."""
        self._decided.wait(timeout)
        return self._admitted


def _result(reply: pb.PushReply) -> PushResult:
    return PushResult(version=reply.version, staleness=reply.staleness, mean_gap=reply.mean_gap,
                      finished=reply.finished, applied=reply.applied)
