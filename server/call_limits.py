"""How many calls the server serves at once, counted where only authenticated calls reach.

gRPC's own ``maximum_concurrent_rpcs`` counts every call from the moment its headers arrive, before
any interceptor has checked the token: a peer without one could fill it with calls that never send
their message, and every worker would be refused. This interceptor comes after the token check
(:mod:`gapaware.server.auth`), so a refused call never counts, and before the reading of requests
(:mod:`gapaware.server.decoding`), so a call over the limit is refused before anything of it is read
or buffered. Health checks, answered without a token, have a small pool of their own
(:data:`gapaware.server.limits.OPEN_CALLS`): they can never take a worker's place.

A call beyond its pool's limit gets ``RESOURCE_EXHAUSTED`` at once; workers retry it with backoff.
"""
from __future__ import annotations

import grpc

from gapaware.server.auth import OPEN_METHODS, RefusalLog
from gapaware.server.limits import OPEN_CALLS
from gapaware.server.refusal import answer


class CallPool:
    """Calls in progress against a limit. Used on the event loop only."""

    def __init__(self, limit: int, flag: str) -> None:
        if limit < 1:
            raise ValueError(f"Invalid call limit: {limit} (at least 1)")
        self.limit = limit
        self.flag = flag
        self.in_flight = 0

    def take(self) -> bool:
        if self.in_flight >= self.limit:
            return False
        self.in_flight += 1
        return True

    def release(self) -> None:
        self.in_flight -= 1


class CallLimitInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, max_calls: int, open_calls: int = OPEN_CALLS, refusals: RefusalLog | None = None) -> None:
        self.calls = CallPool(max_calls, "--max-concurrent-rpcs")
        self.open_calls = CallPool(open_calls, "the pool of health checks")
        self._refusals = refusals or RefusalLog()

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        if not handler.request_streaming:
            raise TypeError("CallLimitInterceptor must come before StrictDecodingInterceptor, which serves every "
                            "method as request-streaming so that nothing is read before the limit is checked")
        pool = self.open_calls if handler_call_details.method in OPEN_METHODS else self.calls
        method = handler_call_details.method
        behavior = handler.stream_stream if handler.response_streaming else handler.stream_unary
        refusals = self._refusals

        async def counted(requests, context):
            if not pool.take():
                reason = (f"the server is serving {pool.limit} calls at once ({pool.flag}): "
                          "retry with backoff")
                refusals.refused(method, context.peer(), reason)
                answer(context, grpc.StatusCode.RESOURCE_EXHAUSTED, reason)
                return None
            try:
                return await behavior(requests, context)
            finally:
                pool.release()

        kind = grpc.stream_stream_rpc_method_handler if handler.response_streaming else \
            grpc.stream_unary_rpc_method_handler
        return kind(counted, response_serializer=handler.response_serializer)
