"""The floor under gapaware's transport: gapaware's calls, with messages of the same sizes, through a
grpc.aio server and a sync client that do nothing with the bytes.

    python -m bench.grpc_floor NBYTES READY_FILE [HOST]   # serves, and writes {"port": N} into READY_FILE

gapaware's server and client check, copy and apply every byte they move; this server answers with
prebuilt messages and drops what it receives, and its client drops the replies. It runs with the
options and receive windows of ``gapaware server`` and ``WorkerClient``. What
separates it from raw TCP is the cost of gRPC itself (Python gRPC copies every message into and out
of ``bytes``, and runs the server's side of every call on one event loop); what separates gapaware
from it is gapaware's own work. Benchmarks 1 and 3 measure it beside gapaware, in the same runs.
"""
from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from pathlib import Path

import grpc

from gapaware.common.transport import DEFAULT_CHUNK_BYTES
from gapaware.processes import NotReady, spawn_ready
from gapaware.server.app import ServerOptions, grpc_options
from gapaware.worker.client import CHANNEL_OPTIONS

SERVICE = "gapaware.bench.Floor"


def _unchanged(message: bytes) -> bytes:
    return message


def _stream_frames(nbytes: int) -> list[bytes]:
    """A tensor of ``nbytes`` as gapaware streams it: chunks of ``DEFAULT_CHUNK_BYTES``."""
    return [bytes(min(DEFAULT_CHUNK_BYTES, nbytes - start)) for start in range(0, nbytes, DEFAULT_CHUNK_BYTES)]


async def _serve(nbytes: int, ready_file: Path, host: str) -> None:
    frames = _stream_frames(nbytes)

    async def drain(requests) -> None:
        async for _ in requests:
            pass

    async def pull(request, context):
        for frame in frames:
            yield frame

    async def push(requests, context):
        await drain(requests)
        yield b""

    async def push_pull(requests, context):
        await drain(requests)
        for frame in frames:
            yield frame

    plain = {"request_deserializer": _unchanged, "response_serializer": _unchanged}
    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "Pull": grpc.unary_stream_rpc_method_handler(pull, **plain),
        "Push": grpc.stream_stream_rpc_method_handler(push, **plain),
        "PushPull": grpc.stream_stream_rpc_method_handler(push_pull, **plain),
    })
    server = grpc.aio.server(options=grpc_options(ServerOptions(), model_bytes=nbytes))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"{host}:0")
    await server.start()
    ready_file.write_text(json.dumps({"port": port}))
    await server.wait_for_termination()


class FloorServer:
    """The floor's server, a process of its own, for tensors of ``nbytes``, listening on ``host``; run under
    the command ``prefix`` when given (``ip netns exec NS``)."""

    def __init__(self, nbytes: int, *, host: str = "127.0.0.1", prefix: tuple[str, ...] = ()) -> None:
        self._workdir = tempfile.TemporaryDirectory(prefix="gapaware-floor-")
        workdir = Path(self._workdir.name)
        ready_file = workdir / "floor.ready"
        try:
            self._process, ready = spawn_ready([*prefix, sys.executable, "-m", "bench.grpc_floor", str(nbytes),
                                                str(ready_file), host], ready_file, workdir / "floor.log")
        except NotReady:
            self._workdir.cleanup()
            raise
        self.port = ready["port"]
        self.address = f"{host}:{self.port}"

    @property
    def pid(self) -> int:
        return self._process.pid

    def close(self) -> None:
        self._process.kill()
        self._process.wait()
        self._workdir.cleanup()

    def __enter__(self) -> FloorServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FloorClient:
    """gapaware's calls for a tensor of ``nbytes`` (streams of chunks, as ``WorkerClient`` sends them),
    sent from prebuilt messages, replies dropped."""

    def __init__(self, address: str, nbytes: int) -> None:
        self._channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._frames = _stream_frames(nbytes)
        plain = {"request_serializer": _unchanged, "response_deserializer": _unchanged}
        self._pull = self._channel.unary_stream(f"/{SERVICE}/Pull", **plain)
        self._push = self._channel.stream_stream(f"/{SERVICE}/Push", **plain)
        self._push_pull = self._channel.stream_stream(f"/{SERVICE}/PushPull", **plain)

    def pull(self) -> None:
        for _ in self._pull(b""):
            pass

    def push(self) -> None:
        for _ in self._push(iter(self._frames)):
            pass

    def push_pull(self) -> None:
        for _ in self._push_pull(iter(self._frames)):
            pass

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> FloorClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":
    asyncio.run(_serve(int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "127.0.0.1"))
