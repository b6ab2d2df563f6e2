"""``gapaware train``: a server and N worker processes on this machine, over loopback gRPC.

The processes are the same ``gapaware server`` and ``gapaware worker`` commands a
cluster runs; this module only starts them, shows progress from the server's Status
and prints the summary the server wrote last to its metrics file. With ``--shards S`` it starts S
servers (``--shard I/S``, each checkpointing into ``OUT/shard-I``) and, since no shard holds the whole
model, evaluates the model assembled from their final checkpoints itself.
"""
from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import click
import grpc
from tqdm import tqdm

from gapaware.command_line import config_flags, flags
from gapaware.common.config import RunConfig
from gapaware.common.evaluation import evaluate_task
from gapaware.common.tasks import load_task
from gapaware.export import assemble, find_checkpoint, model_state
from gapaware.common.security import ClientSecurity, SecurityConfigError, ServerSecurity, load_token
from gapaware.processes import NotReady, ServerProcess, log_tail, start_worker
from gapaware.server.evaluator import describe_metrics
from gapaware.worker.client import WorkerClient
from gapaware.worker.delay import DelaySpec


@dataclass(frozen=True)
class LocalSecurity:
    """The security of a local run, handed to the server and the workers as their own flags.

    The token travels by ``token_file`` or the inherited ``GAPAWARE_TOKEN``, never as an
    argument. Under mutual TLS the workers present the server's certificate as theirs (one
    machine, one identity), so it must allow client authentication too.
    """

    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    tls_ca: Path | None = None
    token_file: Path | None = None

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_ca is None):
            raise SecurityConfigError("a local run with TLS needs the server's --tls-cert/--tls-key and the "
                                      "--tls-ca its workers trust")
        ServerSecurity(self.tls_cert, self.tls_key, self.tls_client_ca)  # refuses incomplete TLS files

    def server_flags(self) -> list[str]:
        return flags({"tls_cert": self.tls_cert, "tls_key": self.tls_key, "tls_client_ca": self.tls_client_ca,
                      "token_file": self.token_file})

    def worker_flags(self) -> list[str]:
        mutual = self.tls_client_ca is not None
        return flags({"tls_ca": self.tls_ca, "tls_cert": self.tls_cert if mutual else None,
                      "tls_key": self.tls_key if mutual else None, "token_file": self.token_file})

    def client(self) -> ClientSecurity:
        """The security of this process's own client (the progress bar)."""
        mutual = self.tls_client_ca is not None
        return ClientSecurity(tls_ca=self.tls_ca, tls_cert=self.tls_cert if mutual else None,
                              tls_key=self.tls_key if mutual else None, token=load_token(self.token_file))


def run_local(config: RunConfig, workers: int, out: Path | None,
              security: LocalSecurity = LocalSecurity(), delay: DelaySpec | None = None, shards: int = 1) -> dict | None:
    out = out or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    click.echo(f"gapaware train: task {config.task}, policy {config.policy}, {workers} workers"
               f"{f', {shards} shards' if shards > 1 else ''}; logs in {out}")
    servers: list[ServerProcess] = []
    procs: list[subprocess.Popen] = []
    try:
        servers += _start_servers(config, out, security, shards)
        server = servers[0]
        address = ",".join(s.address for s in servers)
        delay_flags = [] if delay is None else ["--delay", str(delay)]
        for i in range(workers):
            procs.append(start_worker(address, out, i, *delay_flags, *security.worker_flags()))
        if not _show_progress(server.address, server.proc, procs, security.client()):
            _stop_if_workers_gone(server, procs, out, security.client())
        for each in servers:
            each.proc.wait()
        for proc in procs:
            proc.wait(timeout=30)
    finally:
        for proc in [*procs, *(s.proc for s in servers)]:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for each in servers:
        if each.proc.returncode != 0 or not each.records("final"):
            raise click.ClickException(f"the server failed (exit {each.proc.returncode}); the end of its log "
                                       f"({each.log_path}):\n{log_tail(each.log_path)}")
    final = server.records("final")[-1]
    if shards > 1:
        final = {**final, **_evaluate_shards(out, shards)}
    failed = [i for i, p in enumerate(procs) if p.returncode != 0]
    click.echo(
        f"final {describe_metrics(final)} after {final['version']} updates "
        f"in {time.monotonic() - started:.1f}s; mean staleness {final['run_mean_staleness']:.2f}, "
        f"mean gap {final['run_mean_gap']:.3f}"
        + (f"; workers {failed} exited with errors, see their logs in {out}" if failed else "")
    )
    return final


def _start_servers(config: RunConfig, out: Path, security: LocalSecurity, shards: int) -> list[ServerProcess]:
    """The run's server, or its ``shards`` servers in shard order, started and ready."""
    flags_of_all = [*config_flags(config), *security.server_flags()]
    try:
        if shards == 1:
            return [ServerProcess(out, *flags_of_all, metrics_file=out / "metrics.jsonl")]
        return [ServerProcess(out, *flags_of_all, "--shard", f"{i}/{shards}", "--checkpoint-dir",
                              str(out / f"shard-{i}"), name=f"server-{i}",
                              metrics_file=out / "metrics.jsonl" if i == 0 else None) for i in range(shards)]
    except NotReady as error:
        raise click.ClickException(str(error)) from None


def _evaluate_shards(out: Path, shards: int) -> dict:
    """The test metrics of the model assembled from the shards' final checkpoints."""
    checkpoint = assemble([find_checkpoint(out / f"shard-{i}")[0] for i in range(shards)])
    task = load_task(checkpoint.config.task, seed=checkpoint.config.seed, data_dir=checkpoint.config.data_dir)
    task.model.load_state_dict(model_state(checkpoint))
    metrics = evaluate_task(task, task.model)
    return {**metrics, "eval_metrics": sorted(metrics)}


def _show_progress(address: str, server: subprocess.Popen, workers: list[subprocess.Popen],
                   security: ClientSecurity) -> bool:
    """Shows the run's progress until it ends, the server exits or every worker has exited; returns
    whether the server said the run had finished (or exited by itself)."""
    with WorkerClient(address, timeout=5.0, **security.client_kwargs()) as client:
        try:
            status = client.status()
        except grpc.RpcError:
            return _wait(server, workers)
        with tqdm(total=status.max_updates, unit="upd", dynamic_ncols=True) as bar:
            return _follow(client, server, workers, bar, status)


def _follow(client: WorkerClient, server: subprocess.Popen, workers: list[subprocess.Popen], bar: tqdm,
            status) -> bool:
    """Updates ``bar`` from the server's Status every half second until the run ends (True), the
    server exits (True) or every worker has exited before the end (False)."""
    while True:
        bar.n = status.version
        bar.set_postfix(acc=f"{status.last_accuracy:.3f}", workers=len(status.workers),
                        staleness=f"{status.mean_staleness:.1f}", gap=f"{status.mean_gap:.2f}",
                        refresh=False)
        bar.refresh()
        if status.finished or server.poll() is not None:
            return True
        if all(worker.poll() is not None for worker in workers):
            return False
        time.sleep(0.5)
        try:
            status = client.status()
        except grpc.RpcError:
            return _wait(server, workers)


def _wait(server: subprocess.Popen, workers: list[subprocess.Popen]) -> bool:
    """Waits until the server exits (True) or every worker has (False)."""
    while server.poll() is None:
        if all(worker.poll() is not None for worker in workers):
            return False
        try:
            server.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass
    return True


def _stop_if_workers_gone(server: ServerProcess, workers: list[subprocess.Popen], out: Path,
                          security: ClientSecurity) -> None:
    """Every worker exited before the run ended: nothing would ever push again. Stops the server (it
    then writes its final record) and raises with the end of each worker's log: their last errors."""
    with WorkerClient(server.address, timeout=5.0, **security.client_kwargs()) as client:
        try:
            finished = client.status().finished
        except grpc.RpcError:
            finished = True  # the server is going down by itself: the run ended as the workers left
    if finished:
        return
    server.proc.terminate()
    try:
        server.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.proc.kill()
    errors = "\n".join(f"worker {i} (exit {proc.returncode}, {out / f'worker-{i}.log'}):\n"
                       f"{_last_lines(out / f'worker-{i}.log')}" for i, proc in enumerate(workers))
    raise click.ClickException(f"every worker exited before the run ended; the server was stopped. "
                               f"The workers' last words:\n{errors}")


def _last_lines(log_path: Path, count: int = 5) -> str:
    lines = [line for line in log_tail(log_path).splitlines() if line.strip()]
    return "\n".join(f"  {line}" for line in lines[-count:])
