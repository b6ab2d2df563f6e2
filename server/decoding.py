"""Request bytes that do not parse get ``INVALID_ARGUMENT``, not ``UNKNOWN`` and a traceback.

gRPC parses each request message before the servicer sees it, and reports a parse failure
as an unexpected server error. This interceptor takes parsing over: the handler receives
raw bytes, parses them with the method's own deserializer, and refuses what does not parse
with a message that names the method and the message type.
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import grpc
from google.protobuf.message import DecodeError


class StrictDecodingInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = _strict(handler.request_deserializer, handler_call_details.method)
        serialize = handler.response_serializer

        if handler.request_streaming and handler.response_streaming:
            async def stream_stream(requests, context):
                async for reply in handler.stream_stream(_parse_each(parse, requests, context), context):
                    yield reply
            return grpc.stream_stream_rpc_method_handler(stream_stream, response_serializer=serialize)
        if handler.request_streaming:
            async def stream_unary(requests, context):
                return await handler.stream_unary(_parse_each(parse, requests, context), context)
            return grpc.stream_unary_rpc_method_handler(stream_unary, response_serializer=serialize)
        if handler.response_streaming:
            async def unary_stream(request, context):
                async for reply in handler.unary_stream(await parse(request, context), context):
                    yield reply
            return grpc.unary_stream_rpc_method_handler(unary_stream, response_serializer=serialize)

        async def unary_unary(request, context):
            return await handler.unary_unary(await parse(request, context), context)
        return grpc.unary_unary_rpc_method_handler(unary_unary, response_serializer=serialize)


def _strict(deserializer: Callable[[bytes], object], method: str):
    async def parse(raw: bytes, context: grpc.aio.ServicerContext):
        try:
            return deserializer(raw)
        except DecodeError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"a request message of {method} does not parse (corrupt, or from a program that "
                                "speaks another protocol): check that client and server run the same gapaware")
    return parse


async def _parse_each(parse, requests: AsyncIterator[bytes], context) -> AsyncIterator[object]:
    async for raw in requests:
        yield await parse(raw, context)
