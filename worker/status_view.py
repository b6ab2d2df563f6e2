"""``gapaware status``: the server's Status as a table, or JSON for scripts.

The JSON keeps the proto's field names, numbers as numbers (not the strings that the
proto3 JSON mapping gives 64-bit integers), ``null`` for "not measured yet" and the run
configuration as an object, so ``jq '.version'`` or ``json.load`` need no conversions.
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

COLUMNS = (("worker", 6), ("host", -20), ("device", -8), ("staleness", 9), ("pushes", 8), ("last gap", 8),
           ("last seen", 10))


def plain(message: Message) -> dict:
    """``message`` as a dict of plain Python values; NaN becomes None."""
    out = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.type == FieldDescriptor.TYPE_MESSAGE:
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
    lines = [
        f"server {address}: task {json.loads(reply.run_config_json or '{}').get('task', '?')}, policy {reply.policy}, "
        f"{'finished' if reply.finished else 'running'} for {reply.uptime_seconds:.0f}s",
        f"progress: update {reply.version} of {reply.max_updates}, epoch {reply.epoch:.2f}, {reply.samples} examples",
        f"last test accuracy: {accuracy}",
        f"pushes so far: mean staleness {reply.mean_staleness:.2f}, mean gap {reply.mean_gap:.3f}"
        + (f", {reply.nonfinite_pushes} with NaN/Inf gradients" if reply.nonfinite_pushes else ""),
        f"{len(reply.workers)} live worker{'' if len(reply.workers) == 1 else 's'}, "
        f"{reply.held_snapshots} parameter snapshot{'' if reply.held_snapshots == 1 else 's'} held",
    ]
    if reply.workers:
        lines.append(_row(name for name, _ in COLUMNS))
        lines += [_row((w.worker_id, w.hostname, w.device, w.staleness, w.pushes, f"{w.mean_gap:.3f}",
                        f"{w.last_seen_seconds:.1f}s ago")) for w in reply.workers]
    return "\n".join(lines)


def print_status(address: str, as_json: bool, security: ClientSecurity = ClientSecurity()) -> None:
    try:
        with WorkerClient(address, timeout=10.0, **security.client_kwargs()) as client:
            reply = client.status()
    except grpc.RpcError as error:
        raise UserError(f"no status from {address}: {error.code().name}: {error.details()}",
                        rpc_exit_code(error)) from None
    click.echo(json.dumps(status_dict(reply), indent=2) if as_json else format_status(address, reply))
