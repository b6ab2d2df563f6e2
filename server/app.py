"""Builds and runs the parameter-server process: state, evaluator and the gRPC server."""
from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch

from gapaware.common.config import RunConfig
from gapaware.common.layout import ParamLayout, flat_parameters
from gapaware.common.tasks import load_task
from gapaware.server.evaluator import Evaluator, MetricsLog
from gapaware.server.servicer import ParameterServerServicer, add_to_server
from gapaware.server.state import ParameterServerState

log = logging.getLogger("gapaware.server")

# Chunks are at most 4 MiB; leave room for the frame around them.
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
    ("grpc.max_send_message_length", 8 * 1024 * 1024),
]


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 7070
    metrics_file: Path | None = None
    ready_file: Path | None = None
    linger_seconds: float = 10.0
    eval_device: str = "cpu"
    threads: int = 1                  # torch intra-op threads


def listen_address(host: str, port: int) -> str:
    """``host:port``, with an IPv6 literal bracketed."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def build_state(config: RunConfig):
    """The task (for layout and evaluation) and the server state with the seeded initial parameters."""
    task = load_task(config.task, seed=config.seed, data_dir=config.data_dir)
    layout = ParamLayout.from_module(task.model)
    state = ParameterServerState(config, layout, flat_parameters(task.model), train_size=len(task.train))
    return task, state


async def serve(config: RunConfig, options: ServerOptions) -> dict:
    """Runs the server until the run ends (or SIGTERM/SIGINT), then returns the final record."""
    torch.set_num_threads(options.threads)
    task, state = build_state(config)
    metrics = MetricsLog(options.metrics_file)
    evaluator = Evaluator(state, task, metrics, device=options.eval_device)
    server = grpc.aio.server(options=GRPC_OPTIONS)
    add_to_server(ParameterServerServicer(state, last_eval=lambda: evaluator.last), server)
    address = listen_address(options.host, options.port)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not listen on {address}")
    await server.start()
    log.info("listening on %s: task %s, policy %s, %d parameters, %d updates",
             listen_address(options.host, port), config.task, config.policy, state.layout.numel,
             state.total_updates)
    if options.ready_file is not None:
        options.ready_file.write_text(json.dumps({"port": port}))

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, state.finish)
    evaluator.start()
    try:
        while not state.finished:
            await asyncio.sleep(0.1)
        deadline = time.monotonic() + options.linger_seconds
        while state.live_workers() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        evaluator.stop()
        final = await loop.run_in_executor(None, evaluator.evaluate_now, "final", state.totals())
        log.info("finished at version %d: test accuracy %.4f, loss %.4f", final["version"],
                 final["accuracy"], final["loss"])
        return final
    finally:
        await server.stop(grace=1.0)
        metrics.close()


def run_server(config: RunConfig, options: ServerOptions) -> dict:
    return asyncio.run(serve(config, options))
