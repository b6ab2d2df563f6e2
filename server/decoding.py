"""How the server reads requests: the first message within a deadline, and strictly parsed.

gRPC reads a unary call's request before the handler runs, with no deadline of its own: a peer that
sends a call's headers and never its message (or half of it) would hold the call, and what was
buffered of it, for as long as it liked. This interceptor takes reading over. Every handler is
served as request-streaming, so gRPC reads nothing by itself; the call's first message must arrive
within ``first_message_timeout`` seconds of the handler's start, or the call ends with
``DEADLINE_EXCEEDED``. The rest of a stream is the servicer's to bound (a push's chunk timeout).

gRPC also parses each request message before the servicer sees it, and reports a parse failure as an
unexpected server error. Here the handler receives raw bytes, parses them with the method's own
deserializer, and refuses what does not parse with ``INVALID_ARGUMENT`` and a message that names the
method and the message type.

Every handler this server registers is async: a coroutine function (which may write its replies
itself with ``context.write``, as the health service's ``Watch`` does) or an async generator. The
handlers returned here are coroutine functions of the same two request-streaming kinds, which is
what :class:`gapaware.server.call_limits.CallLimitInterceptor` wraps in turn; they end a call whose
handler raises :class:`~gapaware.server.refusal.Refused` with its status.
"""
from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable

import grpc
from google.protobuf.message import DecodeError

from gapaware.server.limits import DEFAULT_REQUEST_TIMEOUT
from gapaware.server.refusal import Refused, answer


class StrictDecodingInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, first_message_timeout: float = DEFAULT_REQUEST_TIMEOUT) -> None:
        self._first_message_timeout = first_message_timeout

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        parse = _strict(handler.request_deserializer, method)
        timeout = self._first_message_timeout
        behavior = _behavior(handler)

        async def request_of(raw_requests: AsyncIterator[bytes]):
            """What the handler takes: the one parsed request, or the stream of them."""
            first = await _first_message(raw_requests, method, timeout)
            if handler.request_streaming:
                return _parse_each(parse, first, raw_requests)
            if first is None:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"the call to {method} ended without its request")
            return parse(first)

        if not handler.response_streaming:
            async def unary_response(raw_requests, context):
                try:
                    return await behavior(await request_of(raw_requests), context)
                except Refused as refusal:
                    answer(context, refusal.code, refusal.details)
                finally:
                    await _stop_reading(raw_requests)
            return grpc.stream_unary_rpc_method_handler(unary_response,
                                                        response_serializer=handler.response_serializer)

        writes_itself = inspect.iscoroutinefunction(behavior)

        async def streamed_responses(raw_requests, context) -> None:
            try:
                request = await request_of(raw_requests)
                if writes_itself:
                    await behavior(request, context)
                    return
                async for reply in behavior(request, context):
                    await context.write(reply)
            except Refused as refusal:
                answer(context, refusal.code, refusal.details)
            finally:
                await _stop_reading(raw_requests)
        return grpc.stream_stream_rpc_method_handler(streamed_responses,
                                                     response_serializer=handler.response_serializer)


def _behavior(handler: grpc.RpcMethodHandler) -> Callable:
    if handler.request_streaming:
        return handler.stream_stream if handler.response_streaming else handler.stream_unary
    return handler.unary_stream if handler.response_streaming else handler.unary_unary


async def _first_message(raw_requests: AsyncIterator[bytes], method: str, timeout: float) -> bytes | None:
    """The call's first message, None when the client ended its side without one."""
    try:
        async with asyncio.timeout(timeout):
            return await anext(aiter(raw_requests), None)
    except TimeoutError:
        raise Refused(grpc.StatusCode.DEADLINE_EXCEEDED,
                      f"the request of {method} did not arrive within {timeout:g}s of the call's start "
                      "(--request-timeout)") from None


async def _stop_reading(raw_requests: AsyncIterator[bytes]) -> None:
    """Closes gRPC's reader of the call's messages. Left suspended, it would keep the last message it
    read (up to 4 MiB) in a reference cycle with the call until the garbage collector broke it."""
    await aiter(raw_requests).aclose()


def _strict(deserializer: Callable[[bytes], object] | None, method: str) -> Callable[[bytes], object]:
    def parse(raw: bytes):
        if deserializer is None:
            return raw
        try:
            return deserializer(raw)
        except DecodeError:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"a request message of {method} does not parse (corrupt, or from a program that "
                          "speaks another protocol): check that client and server run the same gapaware") from None
    return parse


async def _parse_each(parse, first: bytes | None, raw_requests: AsyncIterator[bytes]) -> AsyncIterator[object]:
    if first is None:
        return
    yield parse(first)
    async for raw in raw_requests:
        yield parse(raw)
