"""A request that cannot be parsed is INVALID_ARGUMENT, never UNKNOWN.

gRPC Python answers a request whose bytes its deserializer rejects with UNKNOWN and a detail
naming the protobuf class. These server interceptors wrap every method handler's
``request_deserializer`` so that a parse failure yields a sentinel instead, and the handler
answers INVALID_ARGUMENT "request: cannot be parsed ..." without running the servicer.
Unary requests are refused before the servicer runs; in a client stream the bad message
raises ``InvalidArgument`` where the servicer reads it (its error table maps it).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import grpc

from services.common.errors import InvalidArgument

PARSE_ERROR = "request: cannot be parsed as the rpc's request message (malformed protobuf or invalid UTF-8 in a string field)"


class _Unparseable:
    """Stands for a message whose bytes did not parse."""


UNPARSEABLE = _Unparseable()


def _guard_deserializer(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # DecodeError, UnicodeDecodeError, RecursionError: all the caller's bytes
            return UNPARSEABLE

    return deserialize


def _sync_unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
    def handle(request: Any, context: grpc.ServicerContext) -> Any:
        if request is UNPARSEABLE:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, PARSE_ERROR)
        return behavior(request, context)

    return handle


def _async_unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if request is UNPARSEABLE:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, PARSE_ERROR)
        return await behavior(request, context)

    return handle


def _sync_stream(behavior: Callable[..., Any]) -> Callable[..., Any]:
    def handle(request_iterator: Any, context: grpc.ServicerContext) -> Any:
        def checked() -> Any:
            for request in request_iterator:
                if request is UNPARSEABLE:
                    raise InvalidArgument(PARSE_ERROR)
                yield request

        return behavior(checked(), context)

    return handle


def _async_stream(behavior: Callable[..., Any]) -> Callable[..., Any]:
    async def handle(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        async def checked() -> Any:
            async for request in request_iterator:
                if request is UNPARSEABLE:
                    raise InvalidArgument(PARSE_ERROR)
                yield request

        return await behavior(checked(), context)

    return handle


def guard_handler(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler | None:
    """The same handler with a deserializer that cannot fail (unary- and stream-unary rpcs).

    Server-streaming handlers are returned unchanged (loupe's services have none besides
    health's Watch).
    """
    if handler is None or handler.response_streaming or handler.request_deserializer is None:
        return handler
    if not hasattr(handler, "_replace"):
        return handler
    if handler.request_streaming:
        behavior = handler.stream_unary
        if behavior is None:
            return handler
        wrapped = _async_stream(behavior) if inspect.iscoroutinefunction(behavior) else _sync_stream(behavior)
        return handler._replace(request_deserializer=_guard_deserializer(handler.request_deserializer), stream_unary=wrapped)
    behavior = handler.unary_unary
    if behavior is None:
        return handler
    wrapped = _async_unary(behavior) if inspect.iscoroutinefunction(behavior) else _sync_unary(behavior)
    return handler._replace(request_deserializer=_guard_deserializer(handler.request_deserializer), unary_unary=wrapped)


class DecodeGuardInterceptor(grpc.ServerInterceptor):
    """Sync-server interceptor applying ``guard_handler`` to every method."""

    def intercept_service(self, continuation: Callable[..., Any], handler_call_details: grpc.HandlerCallDetails) -> Any:
        return guard_handler(continuation(handler_call_details))


class AioDecodeGuardInterceptor(grpc.aio.ServerInterceptor):
    """Asyncio-server interceptor applying ``guard_handler`` to every method."""

    async def intercept_service(self, continuation: Callable[..., Any], handler_call_details: grpc.HandlerCallDetails) -> Any:
        return guard_handler(await continuation(handler_call_details))
