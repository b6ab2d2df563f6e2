"""Builds and runs the parameter-server process: state, evaluator and the gRPC server.

Next to the parameter service the gRPC server carries the standard health service
(SERVING while the run goes on, NOT_SERVING from the moment it ends) and server
reflection, so ``grpc_health_probe``, grpcurl and Kubernetes ``grpc`` probes work.

Every call passes three interceptors in order: the token (:mod:`~gapaware.server.auth`), the
limit of calls at once (:mod:`~gapaware.server.call_limits`) and the reading of the request
(:mod:`~gapaware.server.decoding`); docs/SECURITY.md says what each protects.
"""
from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gapaware.common.config import RunConfig
from gapaware.common.registry import DEFAULTS
from gapaware.common.security import ServerSecurity
from gapaware.common.shards import Shard
from gapaware.common.transport import MAX_MESSAGE_BYTES
from gapaware.server.auth import TokenAuthInterceptor
from gapaware.server.build import build_state
from gapaware.server.call_limits import CallLimitInterceptor
from gapaware.server.checkpoint import CheckpointWriteError
from gapaware.server.checkpointer import Checkpointer, CheckpointOptions
from gapaware.server.decoding import StrictDecodingInterceptor
from gapaware.server.evaluator import Evaluator, MetricsLog, describe_metrics
from gapaware.server.limits import (DEFAULT_CHUNK_TIMEOUT, DEFAULT_MAX_CONCURRENT_RPCS, DEFAULT_MAX_WORKERS,
                                    DEFAULT_MIN_TRANSFER_RATE, DEFAULT_REQUEST_TIMEOUT, connection_options,
                                    raise_open_file_limit, transfer_seconds)
from gapaware.server.observability import RecordSinks, ServerMetrics, TensorBoardLog
from gapaware.server.resume import (ResumeError, check_fresh_directory, find_resume_point, next_incarnation,
                                    resolve_config)
from gapaware.server.servicer import SERVICE_NAME, ParameterServerServicer, add_to_server
from gapaware.server.state import ParameterServerState

log = logging.getLogger("gapaware.server")


class ListenError(OSError):
    """The server cannot listen where it was told to (a port taken by another server): the message says
    what to change."""


def receive_window_options(mib: int) -> list[tuple[str, int]]:
    """gRPC options for a fixed receive window of ``mib`` MiB per stream; 0 keeps gRPC's automatic
    window (bandwidth-delay-product probing).

    gRPC fills a stream's window before the servicer reads it. A push sends nothing but its header
    until it is admitted (:mod:`gapaware.server.admission`); the window bounds what any other stream
    can make the server buffer (bench/memory.py measures it, docs/PERFORMANCE.md section 5). A
    window caps one stream at window ÷ round-trip time; across regions, 0 (automatic) or a bigger
    window is the better choice.
    """
    if mib == 0:
        return []
    return [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", mib * 1024 * 1024)]


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 7070
    metrics_file: Path | None = None
    ready_file: Path | None = None
    linger_seconds: float = 10.0
    eval_device: str = "cpu"
    metrics_port: int = 0               # Prometheus /metrics on this port; 0: off
    tensorboard_dir: Path | None = None
    lease_seconds: float = 0.0                    # 0: workers are never forgotten for silence
    checkpoints: CheckpointOptions | None = None
    resume: Path | None = None                    # continue the run checkpointed there
    explicit_flags: frozenset[str] = frozenset()  # run-config fields given on the command line
    security: ServerSecurity = field(default_factory=ServerSecurity)
    max_concurrent_rpcs: int = DEFAULT_MAX_CONCURRENT_RPCS  # authenticated calls at once; more: RESOURCE_EXHAUSTED
    nonfinite: str = "reject"           # a push with NaN or Inf: "reject" or "skip"
    grad_norm_bound: float = DEFAULTS.grad_norm_bound  # k of the push bound; 0: none
    chunk_timeout: float = DEFAULT_CHUNK_TIMEOUT  # seconds a push may stall between chunks before it is ended
    threads: int = 1                    # torch intra-op threads
    receive_window_mib: int = 4         # per-stream receive window; 0: gRPC's automatic window
    max_workers: int = DEFAULT_MAX_WORKERS            # workers registered at once; more Joins: RESOURCE_EXHAUSTED
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT  # seconds a call's first request message may take to arrive
    min_transfer_rate: float = DEFAULT_MIN_TRANSFER_RATE  # MiB/s below which a tensor transfer is ended
    shard: Shard = field(default_factory=Shard)   # the slice of the model this server owns (gapaware.common.shards)


def listen_address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 literal bracketed."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def prepare_state(config: RunConfig, options: ServerOptions):
    """The task, the state (resumed from ``options.resume`` when it holds a checkpoint) and the
    checkpointer, which has already written this server incarnation's first checkpoint: from then
    on a crash at any moment can be resumed, and worker ids stay unique across restarts."""
    checkpoint_dir = options.checkpoints.directory if options.checkpoints is not None else None
    checkpoint = None if options.resume is None else find_resume_point(options.resume, checkpoint_dir=checkpoint_dir)
    if checkpoint is not None:
        config = resolve_config(checkpoint.config, config, options.explicit_flags)
    elif checkpoint_dir is not None:
        check_fresh_directory(checkpoint_dir)
    task, state = build_state(config, nonfinite=options.nonfinite, grad_norm_bound=options.grad_norm_bound,
                              max_workers=options.max_workers, shard=options.shard)
    if checkpoint is not None:
        others = [checkpoint_dir] if checkpoint_dir is not None else []
        try:
            state.restore(checkpoint, incarnation=next_incarnation(checkpoint, options.resume, *others))
        except ValueError as error:
            raise ResumeError(f"cannot resume this checkpoint with the run's settings: {error}") from None
    checkpointer = None
    if options.checkpoints is not None:
        checkpointer = Checkpointer(state, options.checkpoints)
        checkpointer.directory.remove_partial_writes()
        try:
            checkpointer.save("resumed" if checkpoint is not None else "start")
        except CheckpointWriteError as error:
            raise ResumeError(f"{error}: the server writes its first checkpoint before it serves (it keeps worker "
                              "ids unique across restarts); free space or choose another --checkpoint-dir") from None
    return task, state, checkpointer


async def reap_expired(state: ParameterServerState, lease_seconds: float) -> None:
    """Forgets the workers whose lease expired, off the event loop."""
    expired = await asyncio.get_running_loop().run_in_executor(None, state.reap, lease_seconds)
    for record in expired:
        log.warning("worker %d (%s) silent for over %.1fs: lease expired, forgotten after %d pushes",
                    record.worker_id, record.hostname, lease_seconds, record.pushes)


def grpc_options(options: ServerOptions, model_bytes: int) -> list[tuple[str, int]]:
    """The gRPC options of a server with ``options`` for a model of ``model_bytes``. Chunks are at most
    4 MiB: a message bigger than one with its frame is refused by gRPC itself with RESOURCE_EXHAUSTED
    before it reaches the servicer. An old connection's calls get the longest an honest call takes once
    its request is in (a gradient received, the parameters sent) to finish."""
    longest_call = options.request_timeout + 2 * transfer_seconds(model_bytes, options.chunk_timeout,
                                                                  options.min_transfer_rate)
    return connection_options(MAX_MESSAGE_BYTES, longest_call) + receive_window_options(options.receive_window_mib)


def build_grpc_server(state: ParameterServerState, options: ServerOptions, *, last_eval: Callable[[], dict] = dict,
                      metrics: ServerMetrics | None = None) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """The gRPC server for ``state``, with ``options``' security and limits, bound but not started:
    the parameter service, the standard health service (SERVING once :func:`serve` starts) and
    reflection. Call it inside the event loop that will run the server; returns the server, its
    port and the health servicer.
    """
    security = options.security
    security.check_listen(options.host)
    authentication = [TokenAuthInterceptor(security.token)] if security.token else []
    server = grpc.aio.server(
        options=grpc_options(options, model_bytes=state.layout.numel * 4),
        # Nothing counts against the limit before the token is checked, nothing is read before both.
        interceptors=[*authentication, CallLimitInterceptor(options.max_concurrent_rpcs),
                      StrictDecodingInterceptor(options.request_timeout)],
    )
    add_to_server(ParameterServerServicer(state, last_eval=last_eval, lease_seconds=options.lease_seconds,
                                          metrics=metrics, chunk_timeout=options.chunk_timeout,
                                          min_transfer_rate=options.min_transfer_rate), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = listen_address(options.host, options.port)
    credentials = security.credentials()
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        raise ListenError(f"could not listen on {address}: the port is taken (by another gapaware server? "
                          f"`gapaware status --server {address}` asks it) or the address is not this host's; "
                          "stop that server or give another --port")
    return server, port, health_servicer


async def serve(config: RunConfig, options: ServerOptions) -> dict:
    """Runs the server until the run ends (or SIGTERM/SIGINT), then returns the final record."""
    options.security.check_listen(options.host)  # before the slow part: loading the task
    torch.set_num_threads(options.threads)
    raise_open_file_limit()
    task, state, checkpointer = prepare_state(config, options)
    config = state.config
    metrics = ServerMetrics(state)
    sinks = RecordSinks([MetricsLog(options.metrics_file), metrics,
                         *([TensorBoardLog(options.tensorboard_dir)] if options.tensorboard_dir else [])])
    evaluator = Evaluator(state, task, sinks, device=options.eval_device)
    server, port, health_servicer = build_grpc_server(state, options, last_eval=lambda: evaluator.last,
                                                      metrics=metrics)
    if options.metrics_port:
        try:
            await metrics.serve(options.host, options.metrics_port)
        except OSError as error:
            raise ListenError(str(error)) from None
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("listening on %s (%s): task %s, policy %s, %d parameters%s, %d updates",
             listen_address(options.host, port), options.security.describe(options.host), config.task,
             config.policy, state.layout.numel, f" (shard {state.shard})" if state.shard.count > 1 else "",
             state.total_updates)
    if options.ready_file is not None:
        options.ready_file.write_text(json.dumps({"port": port}))

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, state.finish)
    evaluator.start()
    if checkpointer is not None:
        checkpointer.start()
    try:
        next_reap = time.monotonic()
        while not state.finished:
            await asyncio.sleep(0.1)
            if options.lease_seconds and time.monotonic() >= next_reap:
                await reap_expired(state, options.lease_seconds)
                next_reap = time.monotonic() + min(1.0, options.lease_seconds / 4)
        await health_servicer.enter_graceful_shutdown()
        final_checkpoint_error = None
        if checkpointer is not None:
            checkpointer.stop()
            try:
                await loop.run_in_executor(None, checkpointer.save, "final")
            except CheckpointWriteError as error:  # logged by the checkpointer; the evaluation still comes
                final_checkpoint_error = error
        deadline = time.monotonic() + options.linger_seconds
        while state.live_workers() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        evaluator.stop()
        extra = {**state.totals(), "held_snapshots": state.held_snapshots()}
        final = await loop.run_in_executor(None, evaluator.evaluate_now, "final", extra)
        log.info("finished at version %d: %s", final["version"], describe_metrics(final))
        if final_checkpoint_error is not None:
            raise final_checkpoint_error
        return final
    finally:
        await server.stop(grace=1.0)
        sinks.close()


def run_server(config: RunConfig, options: ServerOptions) -> dict:
    return asyncio.run(serve(config, options))
