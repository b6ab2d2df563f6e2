"""Two network namespaces joined by a veth pair, for network-cut tests (root and ``ip`` needed).

The addresses (10.231.0.1/24 for the server side, 10.231.0.2/24 for the worker side) exist only
inside these namespaces, which are deleted afterwards.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
from dataclasses import dataclass

from bench.network import cannot_make_namespaces, ip

__all__ = ["SERVER_ADDRESS", "WORKER_ADDRESS", "VethPair", "cannot_make_namespaces", "veth_pair"]

SERVER_ADDRESS = "10.231.0.1"
WORKER_ADDRESS = "10.231.0.2"


@dataclass(frozen=True)
class VethPair:
    server_ns: str
    worker_ns: str
    worker_link: str

    def exec_in(self, namespace: str) -> tuple[str, ...]:
        return ("ip", "netns", "exec", namespace)

    def set_link(self, up: bool) -> None:
        """Takes the worker side of the link down (or up again)."""
        ip("-n", self.worker_ns, "link", "set", self.worker_link, "up" if up else "down")


@contextlib.contextmanager
def veth_pair():
    tag = f"{os.getpid() % 100000}"
    pair = VethPair(f"ga4-srv-{tag}", f"ga4-wrk-{tag}", f"ga4w{tag}")
    server_link = f"ga4s{tag}"
    created = []
    try:
        for ns in (pair.server_ns, pair.worker_ns):
            ip("netns", "add", ns)
            created.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("link", "add", server_link, "netns", pair.server_ns, "type", "veth", "peer", "name", pair.worker_link,
           "netns", pair.worker_ns)
        ip("-n", pair.server_ns, "addr", "add", f"{SERVER_ADDRESS}/24", "dev", server_link)
        ip("-n", pair.worker_ns, "addr", "add", f"{WORKER_ADDRESS}/24", "dev", pair.worker_link)
        ip("-n", pair.server_ns, "link", "set", server_link, "up")
        pair.set_link(up=True)
        yield pair
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
