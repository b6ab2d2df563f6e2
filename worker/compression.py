"""The worker's side of compressed transfers: error feedback on its pushes, the parameters it rebuilt
from delta pulls (docs/ALGORITHMS.md#compressed-pushes-and-delta-pulls).

:class:`WorkerClient <gapaware.worker.client.WorkerClient>` holds one of each; both start afresh
when it joins (again), as the server's side does for a new worker id.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator

import torch

from gapaware.common.codecs import ErrorFeedback
from gapaware.common.transport import CODECS, Assembler, TransportError, encode
from gapaware.proto import parameter_server_pb2 as pb


class PushEncoder:
    """A worker's gradients as frames in the push dtype: cast (float32, bfloat16, float16), or quantised
    with error feedback (int8, float8), each chunk as gRPC takes it to send, so that quantizing one
    overlaps sending the one before. A retried push (the same ``seq`` again) sends the same bytes: the
    blocks quantized for an earlier attempt are sent as they are, so what rounding lost is fed back once."""

    def __init__(self, dtype: int, chunk_bytes: int) -> None:
        self.dtype = dtype
        self._codec = CODECS.get(dtype)
        self._chunk_bytes = chunk_bytes
        self._feedback: ErrorFeedback | None = None
        self._seq: int | None = None
        self._quantized = 0  # blocks of push _seq quantized so far
        self._lock = threading.Lock()  # an abandoned attempt's frames may still be taken while its retry starts

    def reset(self) -> None:
        """Forgets what earlier pushes lost: a worker that joins again starts afresh."""
        with self._lock:
            if self._feedback is not None:
                self._feedback.reset()
            self._seq = None

    def encode(self, grad: torch.Tensor, seq: int) -> tuple[pb.TensorHeader, Iterator[bytes]]:
        """The push's header and frames; ``grad`` stays unchanged until the last frame is taken."""
        if self._codec is None:
            return encode(grad, self.dtype, self._chunk_bytes)
        grad = grad.detach().to("cpu", torch.float32)
        with self._lock:
            if self._feedback is None or self._feedback.residual.numel() != grad.numel():
                self._feedback = ErrorFeedback(self._codec, grad.numel())
            if self._seq != seq:
                self._seq, self._quantized = seq, 0
        feedback = self._feedback

        def fill(blocks: tuple[int, int]) -> None:
            with self._lock:
                if self._seq == seq and blocks[1] > self._quantized:
                    feedback.quantize(grad, (max(blocks[0], self._quantized), blocks[1]))
                    self._quantized = blocks[1]

        return encode(feedback.out, self.dtype, self._chunk_bytes, fill=fill)


class PulledParameters:
    """What a worker pulled last. With an 8-bit pull dtype it keeps the tensor it rebuilt and the name
    the server gave it, asks for a delta to it (:meth:`base`) and adds the delta that comes; a pull not
    received whole, or received into another tensor, makes the next one a full pull."""

    def __init__(self, dtype: int) -> None:
        self.dtype = dtype
        self._delta_pulls = dtype in CODECS
        self._held: torch.Tensor | None = None
        self._delta_id = 0

    def reset(self) -> None:
        self._held, self._delta_id = None, 0

    def base(self, out: torch.Tensor | None) -> int:
        """The ``delta_base`` to ask with when the parameters are to arrive in ``out`` (None: where the
        last ones did): 0, a full pull, unless ``out`` holds what the last pull rebuilt."""
        if self._held is None or (out is not None and out is not self._held):
            return 0
        return self._delta_id

    def receive(self, header: pb.PullHeader, frames: Iterator, numel: int, out: torch.Tensor | None) -> torch.Tensor:
        """The parameters ``header`` and its chunks carry, in ``out`` (None: a new tensor, or with delta
        pulls the one the last pull rebuilt)."""
        target = out if out is not None or not self._delta_pulls else self._held
        if header.delta and (target is None or target is not self._held):
            raise TransportError("the server sent a delta to parameters this worker does not hold")
        self.reset()
        assembler = Assembler(header.tensor, numel=numel, out=target, accumulate=header.delta)
        for frame in frames:
            assembler.add(frame)
        parameters = assembler.finish()
        if self._delta_pulls and header.delta_id:
            self._held, self._delta_id = parameters, header.delta_id
        return parameters
