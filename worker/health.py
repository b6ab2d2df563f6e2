"""``gapaware health``: the server's standard gRPC health status, for scripts and container probes."""
from __future__ import annotations

import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

POLL_SECONDS = 1.0


def check_health(address: str, timeout: float = 5.0) -> str:
    """``SERVING``, ``NOT_SERVING``, … as the health service answers, or ``UNREACHABLE``."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError as error:
            return "UNREACHABLE" if error.code() in (grpc.StatusCode.UNAVAILABLE,
                                                     grpc.StatusCode.DEADLINE_EXCEEDED) else error.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def wait_until_serving(address: str, wait_seconds: float) -> str:
    """Asks until the answer is ``SERVING`` or ``wait_seconds`` have passed; returns the last answer."""
    deadline = time.monotonic() + wait_seconds
    while True:
        status = check_health(address, timeout=max(1.0, min(5.0, deadline - time.monotonic())))
        if status == "SERVING" or time.monotonic() >= deadline:
            return status
        time.sleep(POLL_SECONDS)
