"""Two network namespaces joined by a veth pair, for network-cut tests (root and ``ip`` needed).

The addresses (10.231.0.1/24 for the server side, 10.231.0.2/24 for the worker side) exist only
inside these namespaces, which are deleted afterwards.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from dataclasses import dataclass

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
        _ip("-n", self.worker_ns, "link", "set", self.worker_link, "up" if up else "down")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


def cannot_make_namespaces() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"ga4-probe-{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except (subprocess.CalledProcessError, OSError) as error:
        return f"`ip netns add` failed: {getattr(error, 'stderr', '') or error}"
    _ip("netns", "del", probe)
    return None


@contextlib.contextmanager
def veth_pair():
    tag = f"{os.getpid() % 100000}"
    pair = VethPair(f"ga4-srv-{tag}", f"ga4-wrk-{tag}", f"ga4w{tag}")
    server_link = f"ga4s{tag}"
    created = []
    try:
        for ns in (pair.server_ns, pair.worker_ns):
            _ip("netns", "add", ns)
            created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("link", "add", server_link, "netns", pair.server_ns, "type", "veth", "peer", "name", pair.worker_link,
            "netns", pair.worker_ns)
        _ip("-n", pair.server_ns, "addr", "add", f"{SERVER_ADDRESS}/24", "dev", server_link)
        _ip("-n", pair.worker_ns, "addr", "add", f"{WORKER_ADDRESS}/24", "dev", pair.worker_link)
        _ip("-n", pair.server_ns, "link", "set", server_link, "up")
        pair.set_link(up=True)
        yield pair
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
