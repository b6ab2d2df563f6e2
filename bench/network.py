"""Two network namespaces joined by a veth pair, optionally shaped into a slower, longer link.

Needs root and ``ip`` (iproute2), and ``tc`` to shape. The namespaces, the pair and its addresses
(a /30 of 10.200.0.0/16 picked from the process id) exist only while the context is open: they are
deleted when it closes, and at exit if it never closes (a crash, a signal turned into an exit).
Each direction is paced at its sender's end by a token bucket (``tbf``) at the link's rate. The
link's latency is not the kernel's: the kernels this runs on may lack ``netem`` (the VMs of this
project's machines do), so a relay adds it (:mod:`bench.delay`).
"""
from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


def cannot_make_namespaces() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"ga-probe-{os.getpid()}-{secrets.token_hex(2)}"
    try:
        ip("netns", "add", probe)
    except (subprocess.CalledProcessError, OSError) as error:
        return f"`ip netns add` failed: {getattr(error, 'stderr', '') or error}"
    ip("netns", "del", probe)
    return None


@dataclass(frozen=True)
class Shape:
    """A link: ``rate`` in tc's units (``1gbit``, ``100mbit``) and its round-trip time."""

    rate: str
    rtt_ms: float

    @property
    def name(self) -> str:
        return f"{self.rate}/{self.rtt_ms:g}ms"

    @property
    def bytes_per_second(self) -> float:
        units = {"gbit": 1e9, "mbit": 1e6, "kbit": 1e3}
        for suffix, bits in units.items():
            if self.rate.endswith(suffix):
                return float(self.rate.removesuffix(suffix)) * bits / 8
        raise ValueError(f"Invalid rate: {self.rate!r} (a number of gbit, mbit or kbit)")


@dataclass(frozen=True)
class Link:
    """The two sides of an open pair: namespace, interface and address of each."""

    server_ns: str
    server_if: str
    server_address: str
    worker_ns: str
    worker_if: str
    worker_address: str

    def exec_in(self, namespace: str) -> tuple[str, ...]:
        """The command prefix that runs a command in ``namespace``."""
        return "ip", "netns", "exec", namespace


def _shape(namespace: str, interface: str, shape: Shape) -> None:
    # The bucket holds one millisecond at the rate (64 KiB at least: a TSO segment passes whole) and
    # queues up to 100 ms: TCP fills the queue instead of losing packets, as at a cloud's edge.
    burst = max(64 * 1024, int(shape.bytes_per_second / 1000))
    subprocess.run(["ip", "netns", "exec", namespace, "tc", "qdisc", "add", "dev", interface, "root", "tbf", "rate",
                    shape.rate, "burst", str(burst), "latency", "100ms"],
                   check=True, capture_output=True, text=True, timeout=10)


@contextlib.contextmanager
def veth_link(shape: Shape | None = None) -> Iterator[Link]:
    """A fresh pair of namespaces and the link between them, shaped to ``shape`` in both directions."""
    tag = f"{os.getpid() % 100000}{secrets.token_hex(2)}"
    subnet = 4 * (os.getpid() % 16000)  # a /30 of 10.200.0.0/16: .1 the server, .2 the worker
    prefix = f"10.200.{subnet // 256}"
    link = Link(f"ga-srv-{tag}", f"gas{tag}", f"{prefix}.{subnet % 256 + 1}",
                f"ga-wrk-{tag}", f"gaw{tag}", f"{prefix}.{subnet % 256 + 2}")
    created: list[str] = []

    def delete() -> None:
        while created:
            subprocess.run(["ip", "netns", "del", created.pop()], capture_output=True, timeout=10)

    atexit.register(delete)
    try:
        for namespace in (link.server_ns, link.worker_ns):
            ip("netns", "add", namespace)
            created.append(namespace)
            ip("-n", namespace, "link", "set", "lo", "up")
        ip("link", "add", link.server_if, "netns", link.server_ns, "type", "veth", "peer", "name", link.worker_if,
           "netns", link.worker_ns)
        for namespace, interface, address in ((link.server_ns, link.server_if, link.server_address),
                                              (link.worker_ns, link.worker_if, link.worker_address)):
            ip("-n", namespace, "addr", "add", f"{address}/30", "dev", interface)
            ip("-n", namespace, "link", "set", interface, "up")
            if shape is not None:
                _shape(namespace, interface, shape)
        yield link
    finally:
        delete()
        atexit.unregister(delete)
