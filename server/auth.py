"""Token authentication: every call must carry ``authorization: Bearer <token>``.

A server interceptor, so no servicer method can forget the check. The comparison is
constant-time (:func:`hmac.compare_digest`), so the time a refusal takes says nothing
about how much of a guess was right. The token travels in the call's headers, so it is checked
before any of the request is read: a refused call gets ``UNAUTHENTICATED`` at once, without its
request message being waited for, read or decoded, so an unauthenticated peer holds neither a call
slot nor a buffered message beyond the moment its headers arrive.
"""
from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable

import grpc

from gapaware.common.security import TOKEN_ENV, TOKEN_METADATA_KEY, bearer
from gapaware.server.refusal import answer

log = logging.getLogger("gapaware.server.auth")


OPEN_METHODS = ("/grpc.health.v1.Health/Check",)
"""Methods answered without a token: a health check says only SERVING or NOT_SERVING, and Kubernetes
probes and load balancers cannot send one. ``Watch`` stays behind the token: it lasts as long as its
caller likes."""


REFUSAL_LOG_SECONDS = 10.0
"""At most one log line about refused calls per this many seconds."""


class RefusalLog:
    """Logs refused calls, at most one line per ``interval`` seconds with the count of those not
    logged since: a peer that hammers the server with wrong tokens must not flood its log."""

    def __init__(self, interval: float = REFUSAL_LOG_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._clock = clock
        self._next_line = -float("inf")
        self._unlogged = 0

    def refused(self, method: str, peer: str, reason: str) -> None:
        now = self._clock()
        if now < self._next_line:
            self._unlogged += 1
            return
        since = f" ({self._unlogged} more calls refused since the last line)" if self._unlogged else ""
        log.warning("refused %s from %s: %s%s", method, peer, reason, since)
        self._unlogged, self._next_line = 0, now + self._interval


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str, refusals: RefusalLog | None = None) -> None:
        if not token:
            raise ValueError("TokenAuthInterceptor needs a non-empty token")
        self._expected = bearer(token).encode()
        self._refusals = refusals or RefusalLog()

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        if handler_call_details.method in OPEN_METHODS:
            return await continuation(handler_call_details)
        given = [value for key, value in handler_call_details.invocation_metadata or ()
                 if key == TOKEN_METADATA_KEY]
        if len(given) == 1 and hmac.compare_digest(_as_bytes(given[0]), self._expected):
            return await continuation(handler_call_details)
        reason = ("wrong token: the client's GAPAWARE_TOKEN or --token-file differs from the server's"
                  if given else
                  f"this server requires a token: set {TOKEN_ENV} or give --token-file on the client")
        return _refusal(await continuation(handler_call_details), handler_call_details.method, reason,
                        self._refusals)


def _as_bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def _refusal(handler: grpc.RpcMethodHandler | None, method: str, reason: str,
             refusals: RefusalLog) -> grpc.RpcMethodHandler | None:
    """A handler that ends the call with ``UNAUTHENTICATED`` as soon as it runs. It is request-streaming
    whatever the method, so gRPC does not wait for a unary request before running it (the wire does
    not tell the two apart: the client sees its call refused)."""
    if handler is None:  # an unknown method: gRPC answers UNIMPLEMENTED, which reveals nothing
        return None

    async def refuse(requests, context: grpc.aio.ServicerContext) -> None:
        refusals.refused(method, context.peer(), reason)
        answer(context, grpc.StatusCode.UNAUTHENTICATED, reason)

    return grpc.stream_stream_rpc_method_handler(refuse)
