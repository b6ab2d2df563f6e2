"""``gapaware status``: the server's Status as a table, or JSON for scripts."""
from __future__ import annotations

import json

import click
from google.protobuf.json_format import MessageToDict

from gapaware.common.security import ClientSecurity
from gapaware.worker.client import WorkerClient


def print_status(address: str, as_json: bool, security: ClientSecurity = ClientSecurity()) -> None:
    with WorkerClient(address, timeout=10.0, **security.client_kwargs()) as client:
        reply = client.status()
    if as_json:
        click.echo(json.dumps(MessageToDict(reply, always_print_fields_with_no_presence=True), indent=2))
        return
    click.echo(f"server {address}: policy {reply.policy}, version {reply.version}/{reply.max_updates}, "
               f"epoch {reply.epoch:.2f}, {'finished' if reply.finished else 'running'}")
    click.echo(f"last accuracy {reply.last_accuracy:.4f}, mean staleness {reply.mean_staleness:.2f}, "
               f"mean gap {reply.mean_gap:.3f}, up {reply.uptime_seconds:.0f}s"
               + (f", {reply.nonfinite_pushes} non-finite pushes" if reply.nonfinite_pushes else ""))
    click.echo(f"{'worker':>6}  {'host':<20} {'device':<8} {'staleness':>9} {'pushes':>8} {'gap':>8} {'last seen':>10}")
    for w in reply.workers:
        click.echo(f"{w.worker_id:>6}  {w.hostname[:20]:<20} {w.device[:8]:<8} {w.staleness:>9} {w.pushes:>8} "
                   f"{w.mean_gap:>8.3f} {w.last_seen_seconds:>9.1f}s")
