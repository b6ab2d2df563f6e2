"""``gapaware health``: the server's standard gRPC health status, for scripts and container probes."""
from __future__ import annotations

import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gapaware.common.security import ClientSecurity

POLL_SECONDS = 1.0


def check_health(address: str, timeout: float = 5.0, security: ClientSecurity = ClientSecurity()) -> str:
    """``SERVING``, ``NOT_SERVING``, … as the health service answers, or ``UNREACHABLE``. ``security``
    as for any client: a server with TLS is asked over TLS (mutual TLS needs the client's certificate;
    the token is not needed, health is the one open service)."""
    with security.open_channel(address, []) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError as error:
            return "UNREACHABLE" if error.code() in (grpc.StatusCode.UNAVAILABLE,
                                                     grpc.StatusCode.DEADLINE_EXCEEDED) else error.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def wait_until_serving(address: str, wait_seconds: float, security: ClientSecurity = ClientSecurity()) -> str:
    """Asks until the answer is ``SERVING`` or ``wait_seconds`` have passed; returns the last answer."""
    deadline = time.monotonic() + wait_seconds
    while True:
        status = check_health(address, timeout=max(1.0, min(5.0, deadline - time.monotonic())), security=security)
        if status == "SERVING" or time.monotonic() >= deadline:
            return status
        time.sleep(POLL_SECONDS)
