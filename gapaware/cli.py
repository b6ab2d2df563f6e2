"""The ``gapaware`` command line: server, worker, train (a local run) and status."""
from __future__ import annotations

import functools
import json
import logging
import math
import sys
from pathlib import Path

import click

from gapaware.common.allocator import enable_huge_pages
from gapaware.common.config import SCHEDULES, SNAPSHOT_DTYPES, RunConfig

POLICY_NAMES = ("asgd", "staleness-aware", "gap-aware", "dana", "dana-ga")


def _fractions(ctx, param, value: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated fractions such as 0.5,0.75, got {value!r}") from None


def run_config_options(fn):
    """The flags that make up a :class:`RunConfig`, shared by ``server`` and ``train``."""
    options = [
        click.option("--task", default="digits-cnn", show_default=True,
                     help="Built-in task (digits-mlp, digits-cnn, synthetic, cifar10-resnet20) or "
                          "'package.module:factory' returning a gapaware.Task. Imports and runs that code."),
        click.option("--policy", type=click.Choice(POLICY_NAMES), default="gap-aware", show_default=True,
                     help="Staleness policy applied to every push."),
        click.option("--lr", type=float, default=0.05, show_default=True, help="Peak learning rate."),
        click.option("--momentum", type=float, default=0.9, show_default=True, help="Momentum (0 disables)."),
        click.option("--nesterov/--no-nesterov", default=False, show_default=True, help="Nesterov momentum."),
        click.option("--weight-decay", type=float, default=0.0, show_default=True, help="Coupled L2 weight decay."),
        click.option("--warmup-updates", type=int, default=0, show_default=True,
                     help="Linear learning-rate warm-up from 0 over this many updates."),
        click.option("--schedule", type=click.Choice(SCHEDULES), default="step", show_default=True,
                     help="Learning-rate schedule after warm-up."),
        click.option("--decay-at", default="0.5,0.75", show_default=True, callback=_fractions,
                     help="Step schedule: fractions of the run at which the rate is multiplied by --decay-factor."),
        click.option("--decay-factor", type=float, default=0.1, show_default=True, help="Step schedule factor."),
        click.option("--ga-beta", type=float, default=0.999, show_default=True,
                     help="Gap-Aware: decay of the running average of squared steps."),
        click.option("--ga-eps", type=float, default=1e-8, show_default=True, help="Gap-Aware: epsilon in C."),
        click.option("--batch-size", type=int, default=32, show_default=True,
                     help="Examples per worker step (a worker may override it)."),
        click.option("--max-updates", type=int, default=None,
                     help="Stop after this many updates (default 3000 when --epochs is not given either)."),
        click.option("--epochs", type=float, default=None, help="Stop after this many passes over the training set."),
        click.option("--eval-every", type=int, default=100, show_default=True,
                     help="Evaluate on the held-out split every this many updates."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the initial parameters."),
        click.option("--data-dir", default=None, help="Directory with data sets for tasks that read files."),
        click.option("--snapshot-dtype", type=click.Choice(SNAPSHOT_DTYPES), default="float32", show_default=True,
                     help="How the server keeps each worker's pulled parameters for the Gap (gap-aware, dana-ga): "
                          "bfloat16 halves that memory."),
    ]
    return functools.reduce(lambda f, option: option(f), reversed(options), fn)


def config_from_options(values: dict) -> RunConfig:
    """Pops the run-config flags out of ``values`` and builds the config; bad values become usage errors."""
    fields = ("task", "policy", "lr", "momentum", "nesterov", "weight_decay", "warmup_updates", "schedule",
              "decay_at", "decay_factor", "ga_beta", "ga_eps", "batch_size", "eval_every", "seed", "data_dir",
              "snapshot_dtype")
    kwargs = {name: values.pop(name) for name in fields}
    max_updates, epochs = values.pop("max_updates"), values.pop("epochs")
    if max_updates is None and epochs is None:
        max_updates = 3000
    try:
        return RunConfig(max_updates=max_updates or 0, epochs=epochs or 0.0, **kwargs)
    except ValueError as error:
        raise click.UsageError(str(error)) from None


def config_to_flags(config: RunConfig) -> list[str]:
    """The ``server`` command-line flags that reproduce ``config``."""
    flags = []
    for name, value in json.loads(config.to_json()).items():
        flag = "--" + name.replace("_", "-")
        if value is None or (name in ("max_updates", "epochs") and not value):
            continue
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            flags += [flag, ",".join(str(v) for v in value)]
        else:
            flags += [flag, str(value)]
    return flags


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")


log_level_option = click.option("--log-level", default="info", show_default=True,
                                type=click.Choice(["debug", "info", "warning", "error"]))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="gapaware")
def main() -> None:
    """gapaware: an asynchronous parameter server with Gap-Aware staleness mitigation."""


@main.command()
@run_config_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=7070, show_default=True, help="Port to listen on (0 picks a free one).")
@click.option("--metrics-file", type=click.Path(path_type=Path), default=None,
              help="Append evaluation metrics here as JSON lines.")
@click.option("--ready-file", type=click.Path(path_type=Path), default=None,
              help="Write {\"port\": N} here once the server accepts connections.")
@click.option("--linger", type=float, default=10.0, show_default=True,
              help="Seconds to wait for workers to leave after the run ends.")
@click.option("--threads", type=int, default=1, show_default=True,
              help="Torch threads for the updates (memory-bound: more rarely help, and hurt on a busy machine).")
@log_level_option
def server(host, port, metrics_file, ready_file, linger, threads, log_level, **values) -> None:
    """Run the parameter server until the run ends."""
    enable_huge_pages()
    from gapaware.server.app import ServerOptions, run_server

    config = config_from_options(values)
    if threads < 1:
        raise click.UsageError(f"Invalid thread count: {threads}")
    _setup_logging(log_level)
    run_server(config, ServerOptions(host=host, port=port, metrics_file=metrics_file, ready_file=ready_file,
                                     linger_seconds=linger, threads=threads))


@main.command()
@click.option("--server", "address", required=True, help="The parameter server, HOST:PORT.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda:N.")
@click.option("--batch-size", type=int, default=None, help="Examples per step (default: the run's).")
@click.option("--task", default=None, help="Task to load (default: the one the server runs).")
@click.option("--data-dir", default=None, help="Directory with data sets for tasks that read files.")
@click.option("--threads", type=int, default=1, show_default=True, help="Torch threads in this process.")
@click.option("--transport-dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
              show_default=True, help="dtype of gradients and parameters on the wire.")
@log_level_option
def worker(address, device, batch_size, task, data_dir, threads, transport_dtype, log_level) -> None:
    """Join a server and train until the run ends."""
    enable_huge_pages()
    from gapaware.worker.loop import WorkerOptions, run_worker

    _setup_logging(log_level)
    run_worker(WorkerOptions(server=address, device=device, batch_size=batch_size, task=task,
                             data_dir=data_dir, threads=threads, transport_dtype=transport_dtype))


@main.command()
@run_config_options
@click.option("--workers", type=int, default=4, show_default=True, help="Worker processes to start.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Directory for metrics and logs (default: runs/<time>).")
def train(workers, out, **values) -> None:
    """Start a server and WORKERS worker processes on this machine and train."""
    from gapaware.local_run import run_local

    config = config_from_options(values)
    if workers < 1:
        raise click.UsageError(f"Invalid worker count: {workers}")
    final = run_local(config, workers, out)
    if not final or not math.isfinite(final.get("accuracy") or math.nan):
        sys.exit(1)


@main.command()
@click.option("--server", "address", default="127.0.0.1:7070", show_default=True, help="HOST:PORT.")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(address, as_json) -> None:
    """Show the server's version, policy and live workers."""
    from gapaware.worker.status_view import print_status

    print_status(address, as_json)
