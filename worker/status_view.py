"""``gapaware status``: the server's Status as a table, or JSON for scripts.

The JSON keeps the proto's field names, numbers as numbers (not the strings that the
proto3 JSON mapping gives 64-bit integers), ``null`` for "not measured yet" and the run
configuration as an object, so ``jq '.version'`` or ``json.load`` need no conversions. Given a sharded
run's servers, it shows each shard's status (JSON: a list, in shard order).
"""
from __future__ import annotations

import json
import math

import click
import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from gapaware.cli_errors import UserError, rpc_exit_code
from gapaware.common.security import ClientSecurity
from gapaware.worker.client import WorkerClient
from gapaware.worker.sharded import split_addresses

COLUMNS = (("worker", 6), ("host", -20), ("device", -8), ("staleness", 9), ("pushes", 8), ("last gap", 8),
           ("last seen", 10))


def plain(message: Message) -> dict:
    """``message`` as a dict of plain Python values; NaN becomes None."""
    out = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
            value = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in value.items()}
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            value = [plain(v) for v in value] if field.is_repeated else plain(value)
        elif isinstance(value, float) and not math.isfinite(value):
            value = None
        out[field.name] = value
    return out


def status_dict(reply) -> dict:
    data = plain(reply)
    data["run_config"] = json.loads(data.pop("run_config_json") or "{}")
    return data


def _row(values) -> str:
    return "  ".join(f"{str(v)[:abs(w)]:<{-w}}" if w < 0 else f"{str(v):>{w}}" for v, (_, w) in zip(values, COLUMNS))


def format_status(address: str, reply) -> str:
    accuracy = "not evaluated yet" if math.isnan(reply.last_accuracy) else \
        f"{reply.last_accuracy:.4f} (loss {reply.last_loss:.4f})"
    shard = f" (shard {reply.shard_index}/{reply.shard_count}, {reply.parameters} parameters)" \
        if reply.shard_count > 1 else ""
    lines = [
        f"server {address}{shard}: task {json.loads(reply.run_config_json or '{}').get('task', '?')}, policy {reply.policy}, "
        f"{'finished' if reply.finished else 'running'} for {reply.uptime_seconds:.0f}s",
        *(["waiting for the first worker to send the model (--init from-worker)"] if reply.awaiting_model else []),
        f"progress: update {reply.version} of {reply.max_updates}, epoch {reply.epoch:.2f}, {reply.samples} examples",
        f"last test accuracy: {accuracy}",
        *(["last evaluation: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(reply.last_metrics.items()))]
          if reply.last_metrics else []),
        *([f"evaluation errors: {reply.eval_errors}" + (f", last: {reply.last_eval_error}"
                                                        if reply.last_eval_error else "")]
          if reply.eval_errors else []),
        *([f"evaluations skipped (updates outpaced evaluation): {reply.evals_skipped}"] if reply.evals_skipped else []),
        f"pushes so far: mean staleness {reply.mean_staleness:.2f}, mean gap {reply.mean_gap:.3f}"
        + (f", {reply.nonfinite_pushes} with NaN/Inf gradients" if reply.nonfinite_pushes else "")
        + (f", {reply.oversized_pushes} refused over the norm bound" if reply.oversized_pushes else "")
        + (f", {reply.nonfinite_updates} undone for a NaN/Inf result" if reply.nonfinite_updates else ""),
        *_checkpoint_lines(reply),
        f"{len(reply.workers)} live worker{'' if len(reply.workers) == 1 else 's'}, "
        f"{reply.held_snapshots} parameter snapshot{'' if reply.held_snapshots == 1 else 's'} held",
    ]
    if reply.workers:
        lines.append(_row(name for name, _ in COLUMNS))
        lines += [_row((w.worker_id, w.hostname, w.device, w.staleness, w.pushes, f"{w.mean_gap:.3f}",
                        f"{w.last_seen_seconds:.1f}s ago")) for w in reply.workers]
    return "\n".join(lines)


def _checkpoint_lines(reply) -> list[str]:
    """What status says of checkpoints: nothing for a server that writes none and never failed to."""
    if reply.checkpoint_version < 0 and not reply.checkpoint_failures:
        return []
    line = "checkpoints: " + ("none written yet" if reply.checkpoint_version < 0 else
                              f"newest at update {reply.checkpoint_version}")
    if reply.checkpoint_failures:
        line += f"; {reply.checkpoint_failures} writes failed, the last: {reply.last_checkpoint_error}"
    return [line]


def print_status(addresses: str, as_json: bool, security: ClientSecurity = ClientSecurity()) -> None:
    """Prints the status of the server at ``addresses``, or of each of a comma-separated list."""
    parts = split_addresses(addresses)
    replies = [_status(address, security) for address in parts]
    if as_json:
        data = [status_dict(reply) for reply in replies]
        click.echo(json.dumps(data if len(parts) > 1 else data[0], indent=2))
    else:
        click.echo("\n\n".join(format_status(address, reply) for address, reply in zip(parts, replies)))


def _status(address: str, security: ClientSecurity):
    try:
        with WorkerClient(address, timeout=10.0, **security.client_kwargs()) as client:
            return client.status()
    except grpc.RpcError as error:
        raise UserError(f"no status from {address}: {error.code().name}: {error.details()}",
                        rpc_exit_code(error)) from None
