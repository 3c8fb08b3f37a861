"""Domain errors and the one table that maps them to gRPC status codes.

Servicers raise these (or let the algorithm layer's typed errors propagate); the
``grpc_errors`` decorator turns them into a status with the message naming the field.
Anything not in the table is a bug: it is logged with its traceback server-side and the
client sees INTERNAL with a generic message, never the traceback.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import re
from typing import Any, Callable

import grpc

from loupe.tensors import TensorError
from services.common.images import ImageTooLarge, InvalidImage

log = logging.getLogger(__name__)


class LoupeError(Exception):
    """Base of loupe's domain errors."""


class InvalidArgument(LoupeError):
    """A request field is missing or out of range; the message names the field."""


class NotFound(LoupeError):
    """A referenced id does not exist."""


class Overloaded(LoupeError):
    """The server is at capacity or the input exceeds a resource limit.

    ``retry_after_ms`` set = transient overload: sent as the ``grpc-retry-pushback-ms``
    trailer, which gRPC clients with a retry policy honour. None = a limit that a retry
    cannot cure: the trailer says "do not retry" (-1).
    """

    def __init__(self, message: str, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class Unavailable(LoupeError):
    """A required backend (shard, extractor) cannot be reached."""


class DeadlineExceeded(LoupeError):
    """The caller's deadline passed before the work finished."""


class FailedPrecondition(LoupeError):
    """The system is not in a state that allows the operation."""


class DataLoss(LoupeError):
    """Persisted state is corrupt."""


STATUS_TABLE: dict[type[BaseException], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidImage: grpc.StatusCode.INVALID_ARGUMENT,
    TensorError: grpc.StatusCode.INVALID_ARGUMENT,
    ImageTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotFound: grpc.StatusCode.NOT_FOUND,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    DataLoss: grpc.StatusCode.DATA_LOSS,
}


def status_for(exc: BaseException) -> grpc.StatusCode | None:
    """The status code for a domain error, or None when it is not a domain error."""
    for cls in type(exc).__mro__:
        if cls in STATUS_TABLE:
            return STATUS_TABLE[cls]
    return None


_INTERNAL_ADDRESS = re.compile(
    r"\b(?:ipv4|ipv6|dns|unix|unix-abstract):[^\s,;'\")\]}]+?(?=:?(?:[\s,;'\")\]}]|$))"  # gRPC's targets ("ipv4:10.0.0.7:50061")
    r"|\b\d{1,3}(?:\.\d{1,3}){3}(?::\d{1,5})?\b"  # IPv4 literals, with a port
    r"|\[[0-9A-Fa-f.%]*:[0-9A-Fa-f:.%]*\](?::\d{1,5})?"  # bracketed IPv6 literals, with a port
)


def public_details(text: str) -> str:
    """A status message as callers of the public API get it: backend addresses (what gRPC puts
    in a transport failure, e.g. "ipv4:10.0.0.7:50061: Connection refused") replaced by
    ``<internal address>``; the broker logs the full text for operators."""
    return _INTERNAL_ADDRESS.sub("<internal address>", text)


def retry_trailer(exc: BaseException, code: grpc.StatusCode) -> tuple[tuple[str, str], ...]:
    """Trailing metadata telling gRPC's retry machinery whether (and when) to retry."""
    if code != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ()
    ms = getattr(exc, "retry_after_ms", None)
    return (("grpc-retry-pushback-ms", str(int(ms)) if ms is not None else "-1"),)


def grpc_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a servicer method (sync or async) so domain errors become gRPC statuses."""

    if inspect.iscoroutinefunction(method):

        @functools.wraps(method)
        async def async_wrapper(self: Any, request: Any, context: Any) -> Any:
            try:
                return await method(self, request, context)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # mapped below; unknown errors become INTERNAL
                code = status_for(exc)
                if code is None:
                    if isinstance(exc, grpc.aio.AbortError):
                        raise
                    log.exception("internal error in %s", method.__qualname__)
                    await context.abort(grpc.StatusCode.INTERNAL, "internal error (see server log)")
                trailer = retry_trailer(exc, code)
                if trailer:
                    context.set_trailing_metadata(trailer)
                await context.abort(code, str(exc))

        return async_wrapper

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as exc:  # mapped below; unknown errors become INTERNAL
            code = status_for(exc)
            if code is None:
                if exc.__class__.__name__ == "_AbortException" or isinstance(exc, grpc.RpcError):
                    raise
                log.exception("internal error in %s", method.__qualname__)
                context.abort(grpc.StatusCode.INTERNAL, "internal error (see server log)")
            trailer = retry_trailer(exc, code)
            if trailer:
                context.set_trailing_metadata(trailer)
            context.abort(code, str(exc))

    return wrapper
