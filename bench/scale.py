"""Benchmark 4, scale: 256 concurrent lightweight clients pushing and pulling a small model.

    python -m bench.scale

Every client is a coroutine on its own gRPC channel (its own TCP connection), built on the
plain generated asyncio stub and protobuf message objects, so this is also a protobuf peer that
does not use gapaware's wire fast path. After all have joined and pulled, each runs PushPull
round trips for a fixed time. Reported: pushes a second, p50/p99 latency of a round trip, and
errors. Targets (issue 7): zero errors, p99 under 10× p50.
"""
from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import torch

from bench.harness import gapaware_server, machine_line, print_table, quick_or, size_label
from gapaware.common.transport import Assembler, ChunkView, encode
from gapaware.proto import parameter_server_pb2 as pb
from gapaware.proto import parameter_server_pb2_grpc as pb_grpc

CLIENTS = quick_or(16, 256)
SECONDS = quick_or(1.0, 10.0)
MODEL_BYTES = 64 * 1024
CALL_TIMEOUT = 60.0


class Client:
    """One worker on its own channel: join, pull, then push-and-pull round trips."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = pb_grpc.ParameterServerStub(self.channel)
        self.latencies: list[float] = []
        self.errors: list[str] = []

    async def start(self) -> None:
        self.info = await self.stub.Join(pb.JoinRequest(hostname="bench-scale"), timeout=CALL_TIMEOUT)
        self.numel = sum(int(np.prod(p.shape)) for p in self.info.layout.params)
        pull = pb.PullRequest(worker_id=self.info.worker_id, worker_secret=self.info.worker_secret)
        self.version, _ = await self._receive(self.stub.Pull(pull, timeout=CALL_TIMEOUT))
        self.grad = torch.full((self.numel,), 1e-6)

    async def _receive(self, call) -> tuple[int, torch.Tensor]:
        header, assembler = None, None
        async for frame in call:
            kind = frame.WhichOneof("frame")
            if kind == "header":
                header = frame.header
                assembler = Assembler(header.tensor, numel=self.numel)
            elif kind == "chunk":
                assembler.add(ChunkView(frame.chunk.index, memoryview(frame.chunk.data), frame.chunk.crc32c))
        return header.version, assembler.finish()

    def _frames(self):
        header, chunks = encode(self.grad)
        yield pb.PushFrame(header=pb.PushHeader(worker_id=self.info.worker_id, worker_secret=self.info.worker_secret,
                                                base_version=self.version, tensor=header, samples=1, pull=True))
        for chunk in chunks:
            yield pb.PushFrame.FromString(chunk)

    async def run(self, until: float) -> None:
        while time.perf_counter() < until:
            start = time.perf_counter()
            try:
                self.version, _ = await self._receive(self.stub.Push(self._frames(), timeout=CALL_TIMEOUT))
            except grpc.aio.AioRpcError as error:
                self.errors.append(f"{error.code().name}: {error.details()}")
                return
            self.latencies.append(time.perf_counter() - start)


async def load(address: str) -> tuple[list[float], list[str], float]:
    clients = [Client(address) for _ in range(CLIENTS)]
    await asyncio.gather(*(c.start() for c in clients))
    start = time.perf_counter()
    await asyncio.gather(*(c.run(start + SECONDS) for c in clients))
    elapsed = time.perf_counter() - start
    await asyncio.gather(*(c.channel.close() for c in clients))
    return [x for c in clients for x in c.latencies], [e for c in clients for e in c.errors], elapsed


def main() -> None:
    print(f"scale benchmark: {machine_line()}")
    with gapaware_server(MODEL_BYTES, "--policy", "gap-aware") as server:
        latencies, errors, elapsed = asyncio.run(load(server.address))
    p50, p99 = (float(np.percentile(latencies, q)) for q in (50, 99))
    print_table(f"{CLIENTS} concurrent clients for {SECONDS:g} s on a {size_label(MODEL_BYTES)} model "
                "(gap-aware); targets: zero errors, p99 < 10 × p50",
                ["clients", "pushes/s", "p50 ms", "p99 ms", "p99 ÷ p50", "errors"],
                [[CLIENTS, len(latencies) / elapsed, p50 * 1e3, p99 * 1e3, p99 / p50, len(errors)]])
    for message in sorted(set(errors))[:5]:
        print(f"  error: {message}")


if __name__ == "__main__":
    main()
