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

from gapaware.common.buffers import pack_buffers
from gapaware.common.config import RunConfig
from gapaware.common.layout import ParamLayout
from gapaware.common.registry import DEFAULTS, FROM_WORKER
from gapaware.common.security import ServerSecurity
from gapaware.common.shards import Shard
from gapaware.common.tasks import Task, TaskError
from gapaware.common.transport import MAX_MESSAGE_BYTES
from gapaware.server.auth import TokenAuthInterceptor
from gapaware.server.build import build_state, state_from_model
from gapaware.server.call_limits import CallLimitInterceptor
from gapaware.server.checkpoint import CheckpointWriteError
from gapaware.server.checkpointer import Checkpointer, CheckpointOptions
from gapaware.server.decoding import StrictDecodingInterceptor
from gapaware.server.evaluator import Evaluator, MetricsLog, describe_metrics
from gapaware.server.initial import AwaitingModel, Switch
from gapaware.server.limits import (DEFAULT_CHUNK_TIMEOUT, DEFAULT_MAX_CONCURRENT_RPCS, DEFAULT_MAX_WORKERS,
                                    DEFAULT_MIN_TRANSFER_RATE, DEFAULT_REQUEST_TIMEOUT, connection_options,
                                    MIB, raise_open_file_limit, transfer_seconds)
from gapaware.server.observability import RecordSinks, ServerMetrics, TensorBoardLog
from gapaware.server.refusal import Refused
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
    max_model_mib: int = 4096           # --init from-worker: the largest model (float32) a worker may send


def listen_address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 literal bracketed."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def prepare_state(config: RunConfig, options: ServerOptions):
    """The task, the state (resumed from ``options.resume`` when it holds a checkpoint) and the
    checkpointer, which has already written this server incarnation's first checkpoint: from then
    on a crash at any moment can be resumed, and worker ids stay unique across restarts. A run that
    takes its model from a worker has no task, and no state until a worker sent the model, unless
    it resumes: ``(None, None, None)``."""
    checkpoint_dir = options.checkpoints.directory if options.checkpoints is not None else None
    checkpoint = None if options.resume is None else find_resume_point(options.resume, checkpoint_dir=checkpoint_dir)
    if checkpoint is not None:
        config = resolve_config(checkpoint.config, config, options.explicit_flags)
    elif checkpoint_dir is not None:
        check_fresh_directory(checkpoint_dir)
    settings = dict(nonfinite=options.nonfinite, grad_norm_bound=options.grad_norm_bound,
                    max_workers=options.max_workers)
    if config.task != FROM_WORKER:
        task, state = build_state(config, shard=options.shard, **settings)
    elif checkpoint is None:
        return None, None, None
    elif checkpoint.layout is None:
        raise ResumeError("the checkpoint holds no parameter layout (an older gapaware wrote it): a server taking its "
                          "model from a worker cannot resume it; resume it with its --task")
    else:
        task = None
        state = state_from_model(config, checkpoint.layout, checkpoint.theta,
                                 pack_buffers(checkpoint.buffers, checkpoint.layout.buffers), **settings)
    if checkpoint is not None:
        others = [checkpoint_dir] if checkpoint_dir is not None else []
        try:
            state.restore(checkpoint, incarnation=next_incarnation(checkpoint, options.resume, *others))
        except ValueError as error:
            raise ResumeError(f"cannot resume this checkpoint with the run's settings: {error}") from None
    return task, state, start_checkpoints(state, options, resumed=checkpoint is not None)


def start_checkpoints(state: ParameterServerState, options: ServerOptions, *, resumed: bool) -> Checkpointer | None:
    """The checkpointer of ``options``, once it wrote the state's first checkpoint (None: no checkpoints)."""
    if options.checkpoints is None:
        return None
    checkpointer = Checkpointer(state, options.checkpoints)
    checkpointer.directory.remove_partial_writes()
    try:
        checkpointer.save("resumed" if resumed else "start")
    except CheckpointWriteError as error:
        raise ResumeError(f"{error}: the server writes its first checkpoint before it serves (it keeps worker "
                          "ids unique across restarts); free space or choose another --checkpoint-dir") from None
    return checkpointer


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


def parameter_service(state: ParameterServerState, options: ServerOptions, *, last_eval: Callable[[], dict] = dict,
                      report=None, metrics: ServerMetrics | None = None) -> ParameterServerServicer:
    """The parameter service of ``state`` with ``options``' limits; ``report`` records evaluations workers
    report (:meth:`Evaluator.report`)."""
    return ParameterServerServicer(state, last_eval=last_eval, report=report, lease_seconds=options.lease_seconds,
                                   metrics=metrics, chunk_timeout=options.chunk_timeout,
                                   min_transfer_rate=options.min_transfer_rate)


def build_grpc_server(state: ParameterServerState, options: ServerOptions, *, last_eval: Callable[[], dict] = dict,
                      metrics: ServerMetrics | None = None) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """The gRPC server for ``state`` (:func:`grpc_server_for` its parameter service)."""
    return grpc_server_for(parameter_service(state, options, last_eval=last_eval, metrics=metrics), options,
                           model_bytes=state.layout.numel * 4)


def grpc_server_for(service, options: ServerOptions, *,
                    model_bytes: int) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """The gRPC server for the parameter ``service`` of a model of ``model_bytes``, with ``options``'
    security and limits, bound but not started: that service, the standard health service (SERVING
    once :func:`serve` starts) and reflection. Call it inside the event loop that will run the server;
    returns the server, its port and the health servicer.
    """
    security = options.security
    security.check_listen(options.host)
    authentication = [TokenAuthInterceptor(security.token)] if security.token else []
    server = grpc.aio.server(
        options=grpc_options(options, model_bytes=model_bytes),
        # Nothing counts against the limit before the token is checked, nothing is read before both.
        interceptors=[*authentication, CallLimitInterceptor(options.max_concurrent_rpcs),
                      StrictDecodingInterceptor(options.request_timeout)],
    )
    add_to_server(service, server)
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


@dataclass
class Running:
    """What serves a run that has its model: the state, its checkpointer, evaluator, metrics and service."""

    state: ParameterServerState
    checkpointer: Checkpointer | None
    evaluator: Evaluator
    metrics: ServerMetrics
    sinks: RecordSinks
    service: ParameterServerServicer


def running(task: Task | None, state: ParameterServerState, checkpointer: Checkpointer | None,
            options: ServerOptions) -> Running:
    metrics = ServerMetrics(state)
    sinks = RecordSinks([MetricsLog(options.metrics_file), metrics,
                         *([TensorBoardLog(options.tensorboard_dir)] if options.tensorboard_dir else [])])
    evaluator = Evaluator(state, task, sinks, device=options.eval_device)
    service = parameter_service(state, options, last_eval=lambda: evaluator.last, report=evaluator.report,
                                metrics=metrics)
    return Running(state, checkpointer, evaluator, metrics, sinks, service)


async def serve(config: RunConfig, options: ServerOptions) -> dict:
    """Runs the server until the run ends (or SIGTERM/SIGINT), then returns the final record (empty when
    it was stopped before a worker sent the model, ``--init from-worker``)."""
    options.security.check_listen(options.host)  # before the slow part: loading the task
    torch.set_num_threads(options.threads)
    raise_open_file_limit()
    task, state, checkpointer = prepare_state(config, options)
    run = None if state is None else running(task, state, checkpointer, options)
    arrived, stopped = asyncio.Event(), asyncio.Event()

    def on_model(layout: ParamLayout, theta: torch.Tensor, buffers: bytes) -> None:
        nonlocal run
        try:
            state = state_from_model(config, layout, theta, buffers, nonfinite=options.nonfinite,
                                     grad_norm_bound=options.grad_norm_bound, max_workers=options.max_workers)
            run = running(None, state, start_checkpoints(state, options, resumed=False), options)
        except (TaskError, ResumeError) as error:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"the server cannot train this model: {error}") from None
        switch.target = run.service
        arrived.set()

    switch = Switch(run.service if run else AwaitingModel(
        config, on_model, max_parameters=options.max_model_mib * MIB // 4, lease_seconds=options.lease_seconds,
        chunk_timeout=options.chunk_timeout, min_transfer_rate=options.min_transfer_rate))
    server, port, health_servicer = grpc_server_for(
        switch, options, model_bytes=state.layout.numel * 4 if state else options.max_model_mib * MIB)
    if run is not None:
        await serve_metrics(run, options)
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("listening on %s (%s): task %s, policy %s, %s", listen_address(options.host, port),
             options.security.describe(options.host), config.task, config.policy,
             "waiting for the first worker to send the model" if run is None else
             f"{run.state.layout.numel} parameters{f' (shard {run.state.shard})' if run.state.shard.count > 1 else ''}, "
             f"{run.state.total_updates} updates")
    if options.ready_file is not None:
        options.ready_file.write_text(json.dumps({"port": port}))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: run.state.finish() if run else stopped.set())
    try:
        if run is None:
            waits = [asyncio.ensure_future(event.wait()) for event in (arrived, stopped)]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for waiting in waits:
                waiting.cancel()
            if run is None:
                log.info("stopped before any worker sent the model")
                return {}
            await serve_metrics(run, options)
        return await _serve_run(run, options, health_servicer)
    finally:
        await server.stop(grace=1.0)
        if run is not None:
            run.sinks.close()


async def serve_metrics(run: Running, options: ServerOptions) -> None:
    """Serves Prometheus metrics on ``--metrics-port``, when given."""
    if options.metrics_port:
        try:
            await run.metrics.serve(options.host, options.metrics_port)
        except OSError as error:
            raise ListenError(str(error)) from None


async def _serve_run(run: Running, options: ServerOptions, health_servicer) -> dict:
    """Serves the run until it ends, then checkpoints, waits for the workers to leave and evaluates."""
    state, checkpointer, evaluator = run.state, run.checkpointer, run.evaluator
    loop = asyncio.get_running_loop()
    evaluator.start()
    if checkpointer is not None:
        checkpointer.start()
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
    log.info("finished at version %d: %s", final["version"], describe_metrics(final) or
             f"no evaluation of its own; the last one reported: {describe_metrics(evaluator.last_reported)}")
    if final_checkpoint_error is not None:
        raise final_checkpoint_error
    return final


def run_server(config: RunConfig, options: ServerOptions) -> dict:
    return asyncio.run(serve(config, options))
