"""The worker side of the wire contract: join, pull, push, leave.

:class:`WorkerClient` is the public Python API; the training loop in
:mod:`gapaware.worker.loop` is built on it, and users can drive training with it
themselves.
"""
from __future__ import annotations

import math
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gapaware.common.buffers import checksum, pack_buffers, unpack_buffers
from gapaware.common.config import RunConfig
from gapaware.common.layout import ParamLayout
from gapaware.common.registry import TRANSPORT_DTYPES
from gapaware.common.results import PushResult
from gapaware.common.security import client_security
from gapaware.common.transport import (
    DEFAULT_CHUNK_BYTES, TransportError, dtype_from_name, encode, frame_parser, serialize_frame,
)
from gapaware.proto import parameter_server_pb2 as pb
from gapaware.proto import parameter_server_pb2_grpc as pb_grpc
from gapaware.worker.compression import PulledParameters, PushEncoder

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


InitialModel = Callable[[], tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""Gives a model's flat float32 parameters and its buffers by name, for a server that takes its model
from a worker (:meth:`WorkerClient.join`)."""


@dataclass(frozen=True)
class JoinInfo:
    worker_id: int
    config: RunConfig
    layout: ParamLayout
    version: int
    finished: bool
    lease_seconds: float
    worker_secret: bytes = field(default=b"", repr=False)  # presented by every later call as this worker


class WorkerClient:
    """A connection to one parameter server, as one worker.

    ``transport_dtype`` ("float32", "bfloat16" or "float16") is how gradients are sent
    and parameters requested; ``push_dtype`` and ``pull_dtype`` override it for one direction,
    and may also be "int8" or "float8": 8-bit pushes with error feedback, delta pulls
    (:mod:`gapaware.worker.compression`). Tensors handed to and returned by this class are always
    flat float32 CPU tensors.

    Security (see :mod:`gapaware.common.security`): ``tls_ca`` (a PEM file) turns on TLS and
    names the CA that signed the server's certificate; ``tls_cert``/``tls_key`` are this
    client's certificate for a server that requires mutual TLS; ``token`` is the shared
    secret. Each one not given is read as the command line reads it: from ``GAPAWARE_TLS_CA``,
    ``GAPAWARE_TLS_CERT``, ``GAPAWARE_TLS_KEY``, and the token from the file ``GAPAWARE_TOKEN_FILE``
    names or else ``GAPAWARE_TOKEN`` (:func:`gapaware.common.security.client_security`).
    """

    def __init__(self, address: str, *, transport_dtype: str = "float32", push_dtype: str | None = None,
                 pull_dtype: str | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES, timeout: float = 120.0,
                 tls_ca: str | Path | None = None, tls_cert: str | Path | None = None,
                 tls_key: str | Path | None = None, token: str | None = None) -> None:
        self.address = address
        if transport_dtype not in TRANSPORT_DTYPES:
            raise ValueError(f"Invalid transport dtype: {transport_dtype!r} (choose from "
                             f"{', '.join(TRANSPORT_DTYPES)}; 8-bit dtypes go per direction: push_dtype, pull_dtype)")
        self._pushes = PushEncoder(dtype_from_name(push_dtype or transport_dtype), chunk_bytes)
        self._pulled = PulledParameters(dtype_from_name(pull_dtype or transport_dtype))
        self._timeout = timeout
        security = client_security(tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, token=token)
        self._channel: grpc.Channel = security.open_channel(address, CHANNEL_OPTIONS)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._stub = pb_grpc.ParameterServerStub(self._channel)
        # The tensor-carrying methods skip protobuf message objects for chunks (gapaware.common.transport).
        method = f"/{pb.DESCRIPTOR.services_by_name['ParameterServer'].full_name}/"
        parse_pull = frame_parser(pb.PullFrame)
        self._pull_frames = self._channel.unary_stream(
            method + "Pull", request_serializer=pb.PullRequest.SerializeToString,
            response_deserializer=parse_pull, _registered_method=True)
        self._push_frames = self._channel.stream_stream(
            method + "Push", request_serializer=serialize_frame, response_deserializer=parse_pull,
            _registered_method=True)
        self._info: JoinInfo | None = None
        self._seq = 0
        self.buffers: dict[str, torch.Tensor] = {}
        """The server's model buffers (gapaware.common.buffers) as of the last parameters received."""

    # -- lifecycle ------------------------------------------------------------------------
    def join(self, layout: ParamLayout | None = None, *, device: str = "cpu", run_config_sha256: str = "",
             observer: bool = False, initial: InitialModel | None = None) -> JoinInfo:
        """Registers with the server. With ``layout`` the server checks the model matches; with
        ``run_config_sha256`` (a shard of a sharded run, :mod:`gapaware.worker.sharded`) that it runs that run.
        An ``observer`` only pulls, to evaluate (``gapaware evaluate``). A new worker id starts afresh:
        error feedback zeroed, the next pull a full one.

        A server that takes its model from a worker (``server --init from-worker``) and has none yet may
        choose this one to send it: ``initial()`` then gives the model's flat float32 parameters and its
        buffers by name, which are sent before this worker joins again as a worker of the run."""
        reply = self._join(layout, device, run_config_sha256, observer)
        if reply.send_initial:
            if initial is None or layout is None:
                raise ValueError("the server takes its model from the first worker (--init from-worker): join with "
                                 "the model's layout and initial=")
            self._send_initial(reply, *initial())
            reply = self._join(layout, device, run_config_sha256, observer)
        self._info = _join_info(reply)
        self._pushes.reset()
        self._pulled.reset()
        return self._info

    def _join(self, layout: ParamLayout | None, device: str, run_config_sha256: str, observer: bool) -> pb.JoinReply:
        return self._stub.Join(
            pb.JoinRequest(layout=layout.to_proto() if layout else None, hostname=socket.gethostname(),
                           device=device, run_config_sha256=run_config_sha256, observer=observer),
            timeout=self._timeout,
        )

    def _send_initial(self, reply: pb.JoinReply, theta: torch.Tensor, buffers: dict[str, torch.Tensor]) -> None:
        """The model's parameters (float32, whatever the transport dtype) and buffers, to the server that
        chose this worker to send them (``reply``)."""
        self._info = _join_info(reply)
        if theta.dim() != 1 or theta.numel() != self._info.layout.numel:
            raise ValueError(f"the initial parameters must be flat with {self._info.layout.numel} elements")
        packed = pack_buffers(buffers, self._info.layout.buffers)
        tensor, chunks = encode(theta.to(torch.float32), pb.FLOAT32)
        header = pb.PushHeader(worker_id=0, worker_secret=reply.worker_secret, tensor=tensor, initial=True,
                               buffers=packed, buffers_crc32c=checksum(packed))
        self._stream_push(header, chunks)

    def report(self, version: int, metrics: dict[str, float], error: str = "") -> None:
        """Reports an evaluation of the parameters of ``version``, made here: ``metrics`` by name, or the
        ``error`` that stopped it; the server writes it into its metrics stream."""
        self._stub.Report(pb.ReportRequest(worker_id=self.info.worker_id, worker_secret=self.info.worker_secret,
                                           version=version, metrics=metrics, error=error), timeout=self._timeout)

    @property
    def info(self) -> JoinInfo:
        if self._info is None:
            raise RuntimeError("join() first: the server assigns the worker id at Join")
        return self._info

    def leave(self, *, run_finished: bool = False) -> None:
        """Leaves the run; ``run_finished`` tells a later shard of a sharded run that shard 0 ended it."""
        self._stub.Leave(pb.LeaveRequest(worker_id=self.info.worker_id, worker_secret=self.info.worker_secret,
                                         run_finished=run_finished),
                         timeout=self._timeout)
        self._info = None

    def heartbeat(self, timeout: float | None = None) -> bool:
        """Keeps the lease alive; returns True once the run is finished."""
        return self._stub.Heartbeat(pb.HeartbeatRequest(worker_id=self.info.worker_id,
                                                        worker_secret=self.info.worker_secret),
                                    timeout=timeout or self._timeout).finished

    def status(self) -> pb.StatusReply:
        return self._stub.Status(pb.StatusRequest(), timeout=self._timeout)

    def answers(self, timeout: float, *, wait_for_connection: bool = True) -> bool:
        """Whether the server answers within ``timeout`` seconds: a call to the standard health
        service, which needs no token. With ``wait_for_connection`` the call waits for the channel to
        connect (one whose connection broke stays idle until a call asks it to), else it fails at once
        on a broken connection. Any answer counts, ``NOT_SERVING`` too; ``UNAVAILABLE`` (no
        connection, or a proxy with no server behind it) and no answer in time do not. A retry after
        a lost connection asks it (:mod:`gapaware.worker.retry`)."""
        try:
            self._health.Check(health_pb2.HealthCheckRequest(), timeout=timeout, wait_for_ready=wait_for_connection)
        except grpc.RpcError as error:
            return error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        return True

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
        call that fails leaves it partly overwritten. None allocates a new tensor. With delta pulls
        (an 8-bit ``pull_dtype``) the parameters stay in the tensor they arrived in, which the next
        delta updates in place: pass the same ``out`` every time (None: that same tensor), and do not
        write into it; another tensor gets a full pull.
        """
        request = pb.PullRequest(worker_id=self.info.worker_id, dtype=self._pulled.dtype,
                                 worker_secret=self.info.worker_secret, delta_base=self._pulled.base(out))
        frames = iter(self._pull_frames(request, timeout=self._timeout))
        header = self._reply_header(frames)
        return header.version, self._receive(header, frames, out)

    def next_seq(self) -> int:
        """A new push sequence number: pass it as ``seq`` to every attempt of one push."""
        self._seq += 1
        return self._seq

    def push(self, grad: torch.Tensor, base_version: int, *, samples: int = 0,
             loss: float = math.nan, seq: int | None = None,
             buffers: dict[str, torch.Tensor] | None = None) -> PushResult:
        """Sends a gradient computed on the parameters of ``base_version``, and the model's buffers
        after the batch (``buffers``, by name: ``dict(model.named_buffers())``; required when the
        layout has buffers).

        ``seq`` numbers the push for exactly-once delivery: retrying a push whose reply was lost
        with the same ``seq`` is applied at most once (the copy is answered with ``applied=False``).
        None takes :meth:`next_seq`.
        """
        header, _ = self._push(grad, base_version, samples, loss, seq, buffers, pull=False)
        return _result(header.push)

    def push_pull(self, grad: torch.Tensor, base_version: int, *, samples: int = 0,
                  loss: float = math.nan, seq: int | None = None, buffers: dict[str, torch.Tensor] | None = None,
                  out: torch.Tensor | None = None) -> tuple[PushResult, int, torch.Tensor]:
        """Push, then receive the parameters after the update: one round trip a step. ``seq`` and
        ``buffers`` as in :meth:`push`; a retried copy still receives the current parameters; ``out``
        as in :meth:`pull`."""
        header, theta = self._push(grad, base_version, samples, loss, seq, buffers, pull=True, out=out)
        return _result(header.push), header.version, theta

    def _push(self, grad: torch.Tensor, base_version: int, samples: int, loss: float, seq: int | None,
              buffers: dict[str, torch.Tensor] | None, *, pull: bool,
              out: torch.Tensor | None = None) -> tuple[pb.PullHeader, torch.Tensor | None]:
        """One Push call: the header goes first, the chunks once the server's ready frame admitted the
        push (gRPC takes them in a thread of its own, so waiting blocks only this call's sending)."""
        if grad.dim() != 1 or grad.numel() != self.info.layout.numel:
            raise ValueError(f"gradient must be flat with {self.info.layout.numel} elements, "
                             f"got shape {tuple(grad.shape)}")
        specs = self.info.layout.buffers
        if specs and buffers is None:
            raise ValueError(f"the model has {len(specs)} buffers: pass buffers=dict(model.named_buffers())")
        packed = pack_buffers(buffers, specs) if specs else b""
        seq = self.next_seq() if seq is None else seq
        tensor, chunks = self._pushes.encode(grad, seq)
        header = pb.PushHeader(worker_id=self.info.worker_id, worker_secret=self.info.worker_secret,
                               base_version=base_version, seq=seq, samples=samples, loss=loss,
                               tensor=tensor, pull=pull, pull_dtype=self._pulled.dtype,
                               delta_base=self._pulled.base(out) if pull else 0, buffers=packed,
                               buffers_crc32c=checksum(packed))
        reply, frames = self._stream_push(header, chunks)
        return reply, self._receive(reply, frames, out) if pull else None

    def _stream_push(self, header: pb.PushHeader, chunks) -> tuple[pb.PullHeader, Iterator]:
        """Sends ``header``, then ``chunks`` once the server's ready frame admitted the push; returns the
        reply's header and the rest of the reply."""
        decided = threading.Event()  # the ready frame came (admitted), or the call ended without it
        admitted = False

        def requests() -> Iterator[pb.PushFrame | bytes]:
            yield pb.PushFrame(header=header)
            decided.wait()
            if admitted:
                yield from chunks

        replies = iter(self._push_frames(requests(), timeout=self._timeout))
        try:
            if not isinstance(next(replies, None), pb.PushReady):
                raise TransportError("the server's reply to a push did not start with its ready frame")
            admitted = True
            decided.set()
            return self._reply_header(replies), replies
        finally:
            decided.set()

    @staticmethod
    def _reply_header(frames: Iterator) -> pb.PullHeader:
        header = next(frames, None)
        if not isinstance(header, pb.PullHeader):
            raise TransportError("the server's reply did not start with a header")
        return header

    def _receive(self, header: pb.PullHeader, frames: Iterator, out: torch.Tensor | None) -> torch.Tensor:
        parameters = self._pulled.receive(header, frames, self.info.layout.numel, out)
        self.buffers = unpack_buffers(header.buffers, header.buffers_crc32c, self.info.layout.buffers)
        return parameters


def _join_info(reply: pb.JoinReply) -> JoinInfo:
    return JoinInfo(worker_id=reply.worker_id, config=RunConfig.from_json(reply.run_config_json),
                    layout=ParamLayout.from_proto(reply.layout), version=reply.version, finished=reply.finished,
                    lease_seconds=reply.lease_seconds, worker_secret=reply.worker_secret)


def _result(reply: pb.PushReply) -> PushResult:
    return PushResult(version=reply.version, staleness=reply.staleness, mean_gap=reply.mean_gap,
                      finished=reply.finished, applied=reply.applied)
