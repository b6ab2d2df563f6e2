"""The ``gapaware`` command line: server, worker, evaluate, train (a local run), status and simulate."""
from __future__ import annotations

import atexit
import functools
import gc
import logging
import math
import sys
import threading
import time
from pathlib import Path

import click
from click.core import ParameterSource

from gapaware.cli_errors import CleanErrors, ExitCode, UserError
from gapaware.cli_limits import server_limit_options, server_limits_from_options
from gapaware.cli_security import (
    client_security_from_options, client_security_options, local_security_options, server_security_from_options,
    server_security_options,
)
from gapaware.command_line import flags
from gapaware.common.config import RunConfig
from gapaware.common.registry import (
    DEFAULTS, FROM_WORKER, NESTEROV_ASGD, NONFINITE_ACTIONS, POLICY_NAMES, SCHEDULES, SIMULATED_POLICY_NAMES, SNAPSHOT_DTYPES,
    SYNCHRONOUS_SGD, TASK_NAMES, TRANSPORT_DTYPES, WIRE_DTYPES,
)
from gapaware.server.limits import DEFAULT_CHUNK_TIMEOUT, DEFAULT_MAX_CONCURRENT_RPCS

TASK_HELP = (f"Built-in task ({', '.join(TASK_NAMES)}) or 'package.module:factory' returning a gapaware.Task. "
             "Imports and runs that code.")
from gapaware.worker.delay import DelaySpec


def _fractions(ctx, param, value: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated fractions such as 0.5,0.75, got {value!r}") from None


def _lr_scales(ctx, param, values: tuple[str, ...]) -> tuple[tuple[str, float], ...]:
    scales = []
    for value in values:
        pattern, equals, factor = value.rpartition("=")
        try:
            scales.append((pattern, float(factor)))
        except ValueError:
            equals = ""
        if not equals or not pattern:
            raise click.BadParameter(f"expected PATTERN=FACTOR such as 'head.*=10', got {value!r}") from None
    return tuple(scales)


def _delay_spec(ctx, param, value: str | None) -> DelaySpec | None:
    if value is None:
        return None
    try:
        return DelaySpec.parse(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


delay_option = click.option(
    "--delay", default=None, callback=_delay_spec, metavar="SPEC",
    help="Benchmarking: wait after each step as a straggler would. SPEC: none, or any of gamma:mean=S,shape=K ; "
         "hiccup:p=P,length=S ; slow:fraction=F,factor=X ; seed=N joined by ';' (seconds). Worker k waits "
         "the same delays in every run with the same SPEC.")


PARAMETER_GROUP_OPTIONS = (
    click.option("--no-weight-decay", multiple=True, metavar="PATTERN",
                 help="Exclude the parameters whose names match this shell pattern (e.g. '*.bias') from weight "
                      "decay; repeatable."),
    click.option("--weight-decay-skip-bias-norm/--no-weight-decay-skip-bias-norm", default=False, show_default=True,
                 help="Exclude every parameter of at most one dimension from weight decay: biases and the "
                      "weights of normalisation layers, the usual exclusion."),
    click.option("--lr-scale", multiple=True, metavar="PATTERN=FACTOR", callback=_lr_scales,
                 help="Multiply the learning rate of the parameters whose names match PATTERN by FACTOR "
                      "(> 0); repeatable, the first match wins."),
)
"""Parameter groups (README, "Frozen parameters and parameter groups"): server, train and simulate."""


def with_options(options, fn):
    return functools.reduce(lambda f, option: option(f), reversed(options), fn)


def run_config_options(fn):
    """The flags that make up a :class:`RunConfig`, shared by ``server`` and ``train``."""
    options = [
        click.option("--task", default=DEFAULTS.task, show_default=True, help=TASK_HELP),
        click.option("--policy", type=click.Choice(POLICY_NAMES), default=DEFAULTS.policy, show_default=True,
                     help="Staleness policy applied to every push."),
        click.option("--lr", type=float, default=DEFAULTS.lr, show_default=True, help="Peak learning rate."),
        click.option("--momentum", type=float, default=DEFAULTS.momentum, show_default=True,
                     help="Momentum (0 disables)."),
        click.option("--nesterov/--no-nesterov", default=DEFAULTS.nesterov, show_default=True,
                     help="Nesterov momentum."),
        click.option("--weight-decay", type=float, default=DEFAULTS.weight_decay, show_default=True,
                     help="Coupled L2 weight decay."),
        *PARAMETER_GROUP_OPTIONS,
        click.option("--warmup-updates", type=int, default=DEFAULTS.warmup_updates, show_default=True,
                     help="Linear learning-rate warm-up from 0 over this many updates."),
        click.option("--schedule", type=click.Choice(SCHEDULES), default=DEFAULTS.schedule, show_default=True,
                     help="Learning-rate schedule after warm-up."),
        click.option("--decay-at", default=",".join(map(str, DEFAULTS.decay_at)), show_default=True,
                     callback=_fractions,
                     help="Step schedule: fractions of the run at which the rate is multiplied by --decay-factor."),
        click.option("--decay-factor", type=float, default=DEFAULTS.decay_factor, show_default=True,
                     help="Step schedule factor."),
        click.option("--ga-beta", type=float, default=DEFAULTS.ga_beta, show_default=True,
                     help="Gap-Aware: decay of the running average of squared steps."),
        click.option("--ga-eps", type=float, default=DEFAULTS.ga_eps, show_default=True,
                     help="Gap-Aware: epsilon in C."),
        click.option("--batch-size", type=int, default=DEFAULTS.batch_size, show_default=True,
                     help="Examples per worker step (a worker may override it)."),
        click.option("--max-updates", type=int, default=None,
                     help=f"Stop after this many updates (default {DEFAULTS.max_updates} when --epochs is not "
                          "given either)."),
        click.option("--epochs", type=float, default=None, help="Stop after this many passes over the training set."),
        click.option("--eval-every", type=int, default=DEFAULTS.eval_every, show_default=True,
                     help="Evaluate on the held-out split every this many updates."),
        click.option("--seed", type=int, default=DEFAULTS.seed, show_default=True,
                     help="Seed of the initial parameters."),
        click.option("--data-dir", default=None, help="Directory with data sets for tasks that read files."),
        click.option("--snapshot-dtype", type=click.Choice(SNAPSHOT_DTYPES), default=DEFAULTS.snapshot_dtype,
                     show_default=True,
                     help="How the server keeps each worker's pulled parameters for the Gap (gap-aware, dana-ga): "
                          "bfloat16 halves that memory."),
        click.option("--full-pull-every", type=click.IntRange(min=1), default=DEFAULTS.full_pull_every,
                     show_default=True, metavar="K",
                     help="A worker pulling deltas (--pull-dtype int8 or float8) gets a full float32 pull every K "
                          "pulls, besides at join; 1: always full."),
    ]
    return with_options(options, fn)


CONFIG_FIELDS = ("task", "policy", "lr", "momentum", "nesterov", "weight_decay", "warmup_updates", "schedule",
                 "decay_at", "decay_factor", "ga_beta", "ga_eps", "batch_size", "eval_every", "seed", "data_dir",
                 "snapshot_dtype", "full_pull_every", "no_weight_decay", "weight_decay_skip_bias_norm", "lr_scale")


def explicit_config_flags() -> frozenset[str]:
    """The run-config fields the current command line gives explicitly (not by default)."""
    ctx = click.get_current_context()
    return frozenset(name for name in (*CONFIG_FIELDS, "max_updates", "epochs")
                     if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE)


def config_from_options(values: dict) -> RunConfig:
    """Pops the run-config flags out of ``values`` and builds the config; bad values become usage errors."""
    kwargs = {name: values.pop(name) for name in CONFIG_FIELDS}
    max_updates, epochs = values.pop("max_updates"), values.pop("epochs")
    if max_updates is None and epochs is None:
        max_updates = DEFAULTS.max_updates
    try:
        return RunConfig(max_updates=max_updates or 0, epochs=epochs or 0.0, **kwargs)
    except ValueError as error:
        raise click.UsageError(str(error)) from None


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")


log_level_option = click.option("--log-level", default="info", show_default=True,
                                type=click.Choice(["debug", "info", "warning", "error"]))


@click.group(cls=CleanErrors, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="gapaware")
def main() -> None:
    """gapaware: an asynchronous parameter server with Gap-Aware staleness mitigation."""


def _shard(ctx, param, value: str):
    from gapaware.common.shards import Shard

    try:
        return Shard.parse(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


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
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="Serve Prometheus metrics at http://HOST:PORT/metrics (0: off).")
@click.option("--tensorboard", "tensorboard_dir", type=click.Path(path_type=Path), default=None,
              help="Write the evaluation metrics as TensorBoard scalars into this directory "
                   "(needs pip install 'gapaware[tensorboard]').")
@click.option("--lease-seconds", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="Forget a worker not heard from (push, heartbeat) for this long, freeing its snapshot; "
                   "0 never forgets.")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write checkpoints here (default: the --resume directory; none without either).")
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Checkpoint every this many updates (0: not by updates).")
@click.option("--checkpoint-seconds", type=click.FloatRange(min=0), default=300.0, show_default=True,
              help="Checkpoint every this many seconds (0: not by time).")
@click.option("--keep-checkpoints", type=click.IntRange(min=1), default=3, show_default=True,
              help="Keep the newest this many checkpoints.")
@click.option("--resume", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Continue the run from the newest valid checkpoint in this directory (a new run when it "
                   "holds none). Its run config is used; run flags given explicitly override it.")
@server_security_options
@click.option("--nonfinite", type=click.Choice(NONFINITE_ACTIONS), default=DEFAULTS.nonfinite, show_default=True,
              help="A gradient with NaN or Inf, or an update that would leave NaN or Inf in the parameters: "
                   "refuse the push, acknowledge and drop it (either way the parameters stay as they were), or "
                   "apply it (the parameters diverge). Counted in status.")
@click.option("--grad-norm-bound", type=click.FloatRange(min=0), default=DEFAULTS.grad_norm_bound, show_default=True,
              metavar="K",
              help="Refuse a push whose gradient norm exceeds K times the median norm of the last 100 accepted "
                   "pushes (from the 100th on; above 1.8e19 always). 0: no bound. Counted in status.")
@click.option("--max-concurrent-rpcs", type=click.IntRange(min=1), default=DEFAULT_MAX_CONCURRENT_RPCS,
              show_default=True,
              help="Authenticated calls served at once; more get RESOURCE_EXHAUSTED (workers retry it).")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="Torch threads for the updates (memory-bound: more rarely help, and hurt on a busy machine).")
@click.option("--chunk-timeout", type=click.FloatRange(min=0.1), default=DEFAULT_CHUNK_TIMEOUT, show_default=True,
              metavar="SECONDS",
              help="A push that sends no chunk for this long is refused with DEADLINE_EXCEEDED (nothing applied).")
@click.option("--receive-window", "receive_window_mib", type=click.IntRange(min=0, max=1024), default=4,
              show_default=True, metavar="MIB",
              help="gRPC receive window per stream, in MiB: bounds what each push being received (and each "
                   "from a peer that does not wait for its turn) buffers in the server; 0: gRPC's automatic "
                   "window (better across high-latency links).")
@click.option("--shard", type=str, default="0/1", show_default=True, callback=_shard, metavar="I/S",
              help="Serve shard I of S of the model: a contiguous slice of its parameters (README, Sharded "
                   "servers). Start S servers, 0/S to S-1/S, with the same run flags; workers list them all.")
@click.option("--init", "init", type=click.Choice(["task", "from-worker"]), default="task", show_default=True,
              help="Where the model comes from: --task builds it (the server imports that code), or the first "
                   "worker to join sends its layout, parameters and buffers (the server runs none of the user's "
                   "code; evaluation is reported by workers: RemoteOptimizer(evaluate=...), gapaware evaluate).")
@click.option("--max-model-mib", type=click.IntRange(min=1), default=4096, show_default=True, metavar="MIB",
              help="--init from-worker: the largest model, as float32, a worker may send.")
@server_limit_options
@log_level_option
def server(host, port, metrics_file, ready_file, linger, metrics_port, tensorboard_dir, lease_seconds, checkpoint_dir,
           checkpoint_every, checkpoint_seconds, keep_checkpoints, resume, nonfinite, grad_norm_bound,
           max_concurrent_rpcs, threads, chunk_timeout, receive_window_mib, shard, init, max_model_mib, log_level,
           **values) -> None:
    """Run the parameter server until the run ends.

    Exits 0 when the run ended, 2 or 4 when it could not start, and 6 when it ended (final
    evaluation written) but its final checkpoint could not be written: a supervisor restarting it
    then resumes from the newest checkpoint that was."""
    from gapaware.server.app import ListenError, ServerOptions, run_server
    from gapaware.server.checkpoint import CheckpointWriteError
    from gapaware.server.checkpointer import CheckpointOptions
    from gapaware.server.observability import tensorboard_writer_class
    from gapaware.server.resume import ResumeError

    explicit = explicit_config_flags()
    _setup_logging(log_level)
    security = server_security_from_options(values)
    limits = server_limits_from_options(values)
    try:
        security.check_listen(host)
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    if init == "from-worker":
        if "task" in explicit:
            raise click.UsageError("--task and --init from-worker exclude each other: the model comes from one of them")
        if shard.count > 1:
            raise click.UsageError("--init from-worker serves a whole model: a sharded run's servers build theirs "
                                   "with --task")
        values["task"] = FROM_WORKER
        explicit |= {"task"}
    config = config_from_options(values)
    if tensorboard_dir is not None:
        try:
            tensorboard_writer_class()
        except RuntimeError as error:
            raise click.UsageError(str(error)) from None
    if 0 < grad_norm_bound <= 1:
        raise click.BadParameter(f"{grad_norm_bound:g}: the bound is a ratio above 1 (0 turns it off)",
                                 param_hint="--grad-norm-bound")
    checkpoint_dir = checkpoint_dir or resume
    checkpoints = None if checkpoint_dir is None else CheckpointOptions(
        checkpoint_dir, every_updates=checkpoint_every, every_seconds=checkpoint_seconds, keep=keep_checkpoints)
    try:
        run_server(config, ServerOptions(host=host, port=port, metrics_file=metrics_file, ready_file=ready_file,
                                         linger_seconds=linger, metrics_port=metrics_port,
                                         tensorboard_dir=tensorboard_dir, lease_seconds=lease_seconds,
                                         checkpoints=checkpoints, resume=resume, explicit_flags=explicit,
                                         security=security, nonfinite=nonfinite, grad_norm_bound=grad_norm_bound,
                                         max_concurrent_rpcs=max_concurrent_rpcs, threads=threads,
                                         chunk_timeout=chunk_timeout, receive_window_mib=receive_window_mib,
                                         shard=shard, max_model_mib=max_model_mib, **limits))
    except (ResumeError, ListenError) as error:
        raise UserError(str(error), ExitCode.CANNOT_RUN) from None
    except CheckpointWriteError as error:
        click.echo(f"Error: the run ended, but its final checkpoint was not written ({error}); the newest one "
                   "written is in the checkpoint directory", err=True)
        sys.exit(ExitCode.FINAL_CHECKPOINT_LOST)


def _server_address(ctx, param, value: str | None) -> str | None:
    """``--server HOST:PORT``, or every shard's ``H0:P0,H1:P1,...`` (each checked by :func:`_one_address`)."""
    if value is None:
        return value
    for part in value.split(","):
        _one_address(part.strip())
    return value


def _one_address(value: str) -> None:
    """One ``HOST:PORT``, the port required: gRPC would dial port 443 for a bare HOST."""
    host, _, port = value.rpartition(":")
    if ":" not in value or value.endswith("]"):
        raise click.BadParameter(f"{value!r} has no port: give HOST:PORT, e.g. {value}:7070 "
                                 "(the server listens on 7070 unless given --port)")
    if not host:
        raise click.BadParameter(f"{value!r} has no host: give HOST:PORT, e.g. 127.0.0.1{value}")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise click.BadParameter(f"{value!r}: an IPv6 address goes in brackets, as [ADDRESS]:PORT "
                                 "(e.g. [::1]:7070)")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"{value!r}: the port {port!r} is not a number from 1 to 65535")


server_address_option = functools.partial(click.option, "--server", "address", callback=_server_address)


@main.command()
@server_address_option(required=True, help="The parameter server, HOST:PORT; a sharded run's servers "
                                            "H0:P0,H1:P1,... in shard order.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda:N.")
@click.option("--batch-size", type=int, default=None, help="Examples per step (default: the run's).")
@click.option("--task", default=None, help="Task to load (default: the one the server runs).")
@click.option("--data-dir", default=None, help="Directory with data sets for tasks that read files.")
@click.option("--threads", type=int, default=1, show_default=True, help="Torch threads in this process.")
@click.option("--transport-dtype", type=click.Choice(TRANSPORT_DTYPES), default=DEFAULTS.transport_dtype,
              show_default=True, help="dtype of gradients and parameters on the wire.")
@click.option("--push-dtype", type=click.Choice(WIRE_DTYPES), default=None,
              help="dtype of gradients on the wire (default: --transport-dtype); int8 and float8 carry a scale "
                   "per 1024 elements and add what rounding lost to the next gradient.")
@click.option("--pull-dtype", type=click.Choice(WIRE_DTYPES), default=None,
              help="dtype of parameters on the wire (default: --transport-dtype); int8 and float8 send the "
                   "change since the last pull, with a full float32 pull at join and every --full-pull-every.")
@click.option("--prefetch-batches", type=click.IntRange(min=0), default=2, show_default=True,
              help="Batches loaded ahead in a background thread, overlapping the model's compute and the "
                   "round trip to the server; 0 loads each batch in the training thread.")
@click.option("--procs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes to run on this host; {i} in --device becomes each one's index "
                   "(--device cuda:{i}).")
@click.option("--rpc-timeout", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="Seconds a call to the server may take before it is retried.")
@click.option("--retry-initial-backoff", type=click.FloatRange(min=0, min_open=True), default=0.5,
              show_default=True, help="Seconds before the first retry of a failed call (doubling, jittered).")
@click.option("--retry-max-backoff", type=click.FloatRange(min=0, min_open=True), default=15.0,
              show_default=True, help="Longest wait between retries.")
@click.option("--retry-give-up-after", type=click.FloatRange(min=0), default=600.0, show_default=True,
              help="Once the server has answered, give up (exit 5) after retrying one call for this many "
                   "seconds.")
@click.option("--connect-timeout", type=click.FloatRange(min=0), default=30.0, show_default=True, metavar="SECONDS",
              help="Before the server has ever answered, give up (exit 5) after this many seconds of failed "
                   "attempts (a wrong address or port fails fast; a server still starting is waited for); "
                   "0: as long as --retry-give-up-after.")
@click.option("--progress-every", type=click.FloatRange(min=0), default=30.0, show_default=True, metavar="SECONDS",
              help="Log a progress line (steps/s, loss, staleness, Gap) every this many seconds; 0: none.")
@click.option("--autocast", type=click.Choice(["bfloat16"]), default=None,
              help="Run the forward pass and loss under torch.autocast in this dtype (mixed precision); "
                   "parameters, gradients and the wire keep theirs.")
@delay_option
@client_security_options
@log_level_option
def worker(address, device, batch_size, task, data_dir, threads, transport_dtype, prefetch_batches, procs,
           rpc_timeout, retry_initial_backoff, retry_max_backoff, retry_give_up_after, connect_timeout,
           progress_every, autocast, delay, log_level, **values) -> None:
    """Join a server and train until the run ends (SIGTERM/SIGINT: leave and exit 0)."""
    from gapaware.worker.loop import WorkerOptions, run_worker
    from gapaware.worker.procs import run_worker_processes
    from gapaware.worker.retry import RetryPolicy

    _setup_logging(log_level)
    # Python's last garbage collections at exit would walk every object torch and the task made:
    # seconds on a busy machine, for memory the process is about to give back.
    atexit.register(gc.freeze)
    if procs > 1:
        ctx = click.get_current_context()
        devices = [_device_for(device, i) for i in range(procs)]
        sys.exit(run_worker_processes(procs, lambda i: ["worker", *_flags_of(ctx, skip="procs"),
                                                        "--device", devices[i]]))
    try:
        retry = RetryPolicy(initial_backoff=retry_initial_backoff, max_backoff=retry_max_backoff,
                            give_up_after=retry_give_up_after)
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    run_worker(WorkerOptions(server=address, device=_device_for(device, 0), batch_size=batch_size, task=task,
                             data_dir=data_dir, threads=threads, transport_dtype=transport_dtype,
                             push_dtype=values.pop("push_dtype"), pull_dtype=values.pop("pull_dtype"),
                             prefetch_batches=prefetch_batches, rpc_timeout=rpc_timeout, retry=retry,
                             connect_timeout=connect_timeout, progress_every=progress_every,
                             security=client_security_from_options(values), delay=delay, autocast=autocast))


def _device_for(device: str, index: int) -> str:
    try:
        return device.format(i=index)
    except (KeyError, IndexError, ValueError):
        raise click.BadParameter(f"{device!r}: the only placeholder allowed is {{i}}, the process index",
                                 param_hint="--device") from None


def _flags_of(ctx: click.Context, skip: str) -> list[str]:
    """The current command's options as flags that reproduce them, without ``skip`` and --device."""
    return flags({param.opts[0].lstrip("-"): ctx.params.get(param.name) for param in ctx.command.params
                  if isinstance(param, click.Option) and param.name not in (skip, "device")})


@main.command()
@run_config_options
@click.option("--workers", type=int, default=4, show_default=True, help="Worker processes to start.")
@click.option("--shards", type=click.IntRange(min=1), default=1, show_default=True,
              help="Server processes, each serving a shard of the model (README, Sharded servers).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Directory for metrics and logs (default: runs/<time>).")
@delay_option
@local_security_options
def train(workers, shards, out, delay, tls_cert, tls_key, tls_client_ca, tls_ca, token_file, **values) -> None:
    """Start a server (or SHARDS) and WORKERS worker processes on this machine and train."""
    from gapaware.local_run import LocalSecurity, run_local

    config = config_from_options(values)
    if workers < 1:
        raise click.UsageError(f"Invalid worker count: {workers}")
    try:
        security = LocalSecurity(tls_cert=tls_cert, tls_key=tls_key, tls_client_ca=tls_client_ca, tls_ca=tls_ca,
                                 token_file=token_file)
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    final = run_local(config, workers, out, security, delay=delay, shards=shards)
    if not final or "eval_error" in final or not math.isfinite(final.get("loss") or math.nan):
        sys.exit(1)


@main.command()
@server_address_option(required=True, help="The parameter server, HOST:PORT; a sharded run's servers "
                                            "H0:P0,H1:P1,... in shard order.")
@click.option("--task", default=None,
              help="Task whose model and test split to evaluate (default: the server's; required for a server "
                   "started with --init from-worker).")
@click.option("--data-dir", default=None, help="Directory with data sets for tasks that read files.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda:N.")
@click.option("--every", type=click.IntRange(min=1), default=None, metavar="UPDATES",
              help="Evaluate every this many updates (default: the run's --eval-every).")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help="Torch threads.")
@click.option("--connect-timeout", type=click.FloatRange(min=0), default=30.0, show_default=True, metavar="SECONDS",
              help="Give up (exit 5) when the server has not answered for this long at the start.")
@client_security_options
@log_level_option
def evaluate(address, task, data_dir, device, every, threads, connect_timeout, log_level, **values) -> None:
    """Evaluate a run's parameters here, where the task's code is, every EVERY updates and at the end,
    and report the metrics into the server's metrics stream (file, Prometheus, TensorBoard, status)."""
    from gapaware.common.devices import check_device
    from gapaware.worker.evaluate import EvaluateOptions, run_evaluator
    from gapaware.worker.loop import stop_on_signals

    _setup_logging(log_level)
    check_device(device)
    options = EvaluateOptions(server=address, task=task, data_dir=data_dir, device=device, every=every,
                              threads=threads, connect_timeout=connect_timeout,
                              security=client_security_from_options(values))
    with stop_on_signals(threading.Event()) as stop:
        run_evaluator(options, stop)


@main.command()
@server_address_option(default="127.0.0.1:7070", show_default=True,
                       help="HOST:PORT; a sharded run's servers H0:P0,H1:P1,... to show every shard.")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON (a list for several servers).")
@client_security_options
def status(address, as_json, **values) -> None:
    """Show the server's version, policy and live workers (each shard's, for a list)."""
    from gapaware.worker.status_view import print_status

    print_status(address, as_json, client_security_from_options(values))


@main.command()
@server_address_option(default="127.0.0.1:7070", show_default=True,
                       help="HOST:PORT; a sharded run's servers H0:P0,H1:P1,... to ask each.")
@click.option("--wait", type=float, default=0.0, show_default=True,
              help="Keep asking for up to this many seconds in all until the server (every one) is SERVING.")
@client_security_options
def health(address, wait, **values) -> None:
    """Ask the server's standard gRPC health service; exit 0 only when it is (every one is) SERVING."""
    from gapaware.worker.health import wait_until_serving
    from gapaware.worker.sharded import split_addresses

    serving = True
    deadline = time.monotonic() + wait  # one --wait for every shard, not one each
    for each in split_addresses(address):
        status = wait_until_serving(each, max(0.0, deadline - time.monotonic()), client_security_from_options(values))
        click.echo(f"{each}: {status}")
        serving = serving and status == "SERVING"
    if not serving:
        sys.exit(1)


@main.command()
@click.argument("metrics_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="PNG to write (default: the metrics file with .png).")
def plot(metrics_file, out) -> None:
    """Plot a run's metrics file: accuracy and loss against time and updates, staleness, Gap."""
    from gapaware.plot import PlotError, plot_metrics

    out = out or metrics_file.with_suffix(".png")
    try:
        plot_metrics(metrics_file, out)
    except PlotError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"wrote {out}")


@main.command()
@click.argument("sources", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="safetensors file to write the model's state_dict() to.")
@click.option("--data-dir", default=None, help="Directory with data sets for tasks that read files.")
def export(sources, out, data_dir) -> None:
    """Write the model of a checkpoint (SOURCE: a checkpoint file, a --checkpoint-dir or a run directory
    holding one as 'checkpoints', whose newest valid checkpoint is taken) as its full state_dict(),
    parameters and buffers, to a safetensors file: model.load_state_dict(safetensors.torch.load_file(OUT)).
    A sharded run's model: give every shard's SOURCE, in any order; they are assembled."""
    from gapaware.common.tasks import TaskError
    from gapaware.export import ExportError, export_model

    try:
        read = export_model(sources, out, data_dir)
    except (ExportError, TaskError) as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"wrote {out} from {', '.join(map(str, read))}")


def _positive_ints(ctx, param, value: str) -> tuple[int, ...]:
    try:
        numbers = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated whole numbers such as 1,8,32, got {value!r}") from None
    if not numbers or min(numbers) < 1:
        raise click.BadParameter(f"expected numbers >= 1, got {value!r}")
    return tuple(dict.fromkeys(numbers))


def _simulated_policies(ctx, param, value: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
    unknown = [name for name in names if name not in SIMULATED_POLICY_NAMES]
    if not names or unknown:
        raise click.BadParameter(f"unknown policy {', '.join(unknown) or value!r}; choose from "
                                 f"{', '.join(SIMULATED_POLICY_NAMES)}")
    return names


@main.command()
@click.option("--task", default=DEFAULTS.task, show_default=True, help=TASK_HELP)
@click.option("--data-dir", default=None, help="Directory with data sets for tasks that read files.")
@click.option("--workers", default="1,8,32,64", show_default=True, callback=_positive_ints,
              help="Comma-separated numbers of virtual workers N to simulate.")
@click.option("--policies", default=",".join(SIMULATED_POLICY_NAMES), show_default=True,
              callback=_simulated_policies,
              help=f"Comma-separated policies: the server's, {NESTEROV_ASGD} (asgd with Nesterov momentum) and "
                   f"{SYNCHRONOUS_SGD} (synchronous SGD, the reference).")
@click.option("--seeds", type=click.IntRange(min=1), default=3, show_default=True,
              help="Runs per policy and N, with seeds 0, 1, ... (initial parameters, batch order, worker times).")
@click.option("--epochs", type=float, default=DEFAULTS.simulated_epochs, show_default=True,
              help="Passes over the training set per run, the same for every N and policy.")
@click.option("--batch-size", type=int, default=DEFAULTS.batch_size, show_default=True,
              help="Examples per worker batch.")
@click.option("--lr", type=float, default=DEFAULTS.lr, show_default=True,
              help=f"Peak learning rate, the same for every N; step decay x{DEFAULTS.decay_factor:g} at "
                   f"{' and '.join(f'{at:.0%}' for at in DEFAULTS.decay_at)} of the updates.")
@click.option("--momentum", type=float, default=DEFAULTS.momentum, show_default=True,
              help=f"Momentum of every policy (0 disables; {NESTEROV_ASGD} needs > 0).")
@click.option("--weight-decay", type=float, default=DEFAULTS.weight_decay, show_default=True,
              help="Coupled L2 weight decay.")
@functools.partial(with_options, PARAMETER_GROUP_OPTIONS)
@click.option("--gamma-shape", type=float, default=DEFAULTS.gamma_shape, show_default=True,
              help="Shape k of the gamma distribution of a worker's time per batch (mean 1, coefficient "
                   "of variation 1/sqrt(k)).")
@click.option("--heterogeneous/--no-heterogeneous", default=False,
              help="Draw each worker's own mean time per batch too (gamma, mean 1, same shape): some "
                   "machines stay slower, as in a non-dedicated cloud.")
@click.option("--eval-points", type=click.IntRange(min=1), default=DEFAULTS.eval_points, show_default=True,
              help="Test-set evaluations per run, evenly spaced; the last one is the final accuracy.")
@click.option("--jobs", type=click.IntRange(min=0), default=0, show_default=True,
              help="Runs at once, one process and one thread each (0: one per CPU core).")
@click.option("--device", default="cpu", show_default=True, help="Where gradients are computed: cpu or cuda:N.")
@click.option("--push-dtype", type=click.Choice(WIRE_DTYPES), default=DEFAULTS.transport_dtype, show_default=True,
              help="What the virtual workers' gradients are rounded to, as by gapaware worker --push-dtype "
                   "(int8, float8: with error feedback).")
@click.option("--pull-dtype", type=click.Choice(WIRE_DTYPES), default=DEFAULTS.transport_dtype, show_default=True,
              help="What their parameters are rounded to, as by gapaware worker --pull-dtype (int8, float8: "
                   "delta pulls).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Directory for results.csv, curves.csv, results.md and results.png "
                   "(default: runs/simulate-<time>).")
def simulate(task, data_dir, workers, policies, seeds, epochs, batch_size, lr, momentum, weight_decay,
             no_weight_decay, weight_decay_skip_bias_norm, lr_scale, gamma_shape, heterogeneous, eval_points, jobs,
             device, push_dtype, pull_dtype, out) -> None:
    """Simulate N asynchronous workers on this machine and compare staleness policies.

    Each virtual worker's time per batch is gamma-distributed; gradients are applied in order of
    completion with the server's own policy code, so the mean staleness is about N-1.
    """
    from gapaware.simulator.command import run_simulation
    from gapaware.simulator.runner import SimulationSettings

    try:
        settings = SimulationSettings(task=task, data_dir=data_dir, lr=lr, momentum=momentum,
                                      weight_decay=weight_decay, no_weight_decay=no_weight_decay,
                                      weight_decay_skip_bias_norm=weight_decay_skip_bias_norm, lr_scale=lr_scale,
                                      batch_size=batch_size, epochs=epochs,
                                      gamma_shape=gamma_shape, heterogeneous=heterogeneous,
                                      eval_points=eval_points, device=device, push_dtype=push_dtype,
                                      pull_dtype=pull_dtype)
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    run_simulation(settings, policies=policies, workers=workers, seeds=seeds, jobs=jobs, out=out)


ENVVAR_PREFIX = "GAPAWARE_"


def envvar_for(option: click.Option) -> str:
    """``--metrics-port`` -> ``GAPAWARE_METRICS_PORT``: one variable per flag name, the same in every command."""
    longest = max(option.opts, key=len)
    return ENVVAR_PREFIX + longest.lstrip("-").replace("-", "_").upper()


def add_envvars(group: click.Group) -> None:
    """Gives every option of every command its ``GAPAWARE_…`` variable, shown in ``--help``.

    Done here once, so a new flag gets its variable without anyone writing it; an option
    that names its own ``envvar`` keeps it. A flag given on the command line wins.
    """
    for command in group.commands.values():
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden and not param.is_eager:
                param.envvar = param.envvar or envvar_for(param)
                param.show_envvar = True


add_envvars(main)
