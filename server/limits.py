"""How much of the server one peer may hold, and for how long: the defaults of the limit flags, the
deadline of a tensor transfer, and the gRPC connection settings that bound what reaches the servicer.

docs/SECURITY.md is the threat model these numbers serve: it says which credential each limit
stands in front of. Free of torch and gRPC, so the command line reads the defaults quickly.
"""
from __future__ import annotations

import logging
import resource

log = logging.getLogger("gapaware.server")

MIB = 1024 * 1024

DEFAULT_MAX_WORKERS = 256
"""Workers registered at once (``--max-workers``): each may hold a snapshot of the model and one
parameter transfer, so the cap bounds what joining can cost the server."""

DEFAULT_MAX_CONCURRENT_RPCS = 1024
"""Authenticated calls served at once (``--max-concurrent-rpcs``); a worker makes two at a time at most
(a push and a heartbeat)."""

DEFAULT_REQUEST_TIMEOUT = 10.0
"""Seconds from a call's start by which its (first) request message must have arrived (``--request-timeout``)."""

DEFAULT_CHUNK_TIMEOUT = 15.0
"""Seconds a push may go without a chunk (``--chunk-timeout``); also the floor of every transfer's deadline."""

DEFAULT_MIN_TRANSFER_RATE = 1.0
"""MiB/s below which a tensor transfer is ended (``--min-transfer-rate``): 8 Mbit/s, slower than any
link a worker trains over."""

OPEN_CALLS = 32
"""Health checks (the one service answered without the token) served at once, apart from the
authenticated calls, so that unauthenticated probes can never take a worker's place."""

STREAMS_PER_CONNECTION = 100
"""Calls one HTTP/2 connection may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS)."""

HANDSHAKE_TIMEOUT_SECONDS = 10
"""A connection that has not completed its TLS and HTTP/2 handshake by then is closed."""

CONNECTION_IDLE_SECONDS = 60
"""A connection without a call for this long is closed (GOAWAY); a client reconnects on its next call."""

CONNECTION_AGE_SECONDS = 600
"""A connection is told to go away (GOAWAY) after this long, and closed once its calls have had the
grace of :func:`connection_options` to finish; the client's next call opens a new one. This is what
finally ends a stream whose reply its client never reads (gRPC cannot end it sooner from the server)."""

WANTED_OPEN_FILES = 65536
"""Descriptors the server asks for at start (up to the hard limit): one per connection."""

FEWEST_OPEN_FILES = 4096
"""Below this many descriptors the server warns at start."""


def transfer_seconds(nbytes: int, chunk_timeout: float, min_rate_mib: float) -> float:
    """How long sending or receiving a tensor of ``nbytes`` may take once it starts: the chunk timeout
    plus the bytes at the minimum rate. A transfer that takes longer holds its buffer for a peer
    that is not there (a stalled or hostile one) and is ended."""
    return chunk_timeout + nbytes / (min_rate_mib * MIB)


def connection_options(max_message_bytes: int, longest_call_seconds: float) -> list[tuple[str, int]]:
    """gRPC server options that bound each connection: the largest message (a chunk and its framing),
    one server per port, calls per connection, and how long a silent, or old, connection is kept; an
    old connection's calls get ``longest_call_seconds`` to finish."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # gRPC's default lets a second server bind the same port and take half the connections.
        ("grpc.so_reuseport", 0),
        ("grpc.max_concurrent_streams", STREAMS_PER_CONNECTION),
        ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_SECONDS * 1000),
        ("grpc.max_connection_idle_ms", CONNECTION_IDLE_SECONDS * 1000),
        ("grpc.max_connection_age_ms", CONNECTION_AGE_SECONDS * 1000),
        ("grpc.max_connection_age_grace_ms", int(longest_call_seconds * 1000)),
    ]


def raise_open_file_limit(wanted: int = WANTED_OPEN_FILES) -> int:
    """Raises this process's soft descriptor limit towards ``wanted`` (never above the hard limit, never
    lowering it) and returns the limit in force. With the common default of 1,024, a thousand idle
    connections leave no descriptor for a worker's; a low hard limit is logged with its remedy."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft < FEWEST_OPEN_FILES:
        log.warning("only %d file descriptors (the hard limit): each connection takes one, so a peer that "
                    "opens that many connections blocks the workers' until they time out; raise it "
                    "(LimitNOFILE= in the systemd unit, ulimit -Hn, or the container's nofile ulimit)", soft)
    return soft
