"""Where the broker's backend clients turn transport errors into loupe's own errors.

The shard and extractor clients (``services.broker.backends``) are the only broker code that
sees gRPC: everything above them (search pipeline, rerank stages, reads, writes) handles the
domain errors of ``services.common.errors`` only — as Qdrant keeps its internal transport apart
from its public API. One table here says which backend status becomes which error.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, TypeVar

import grpc

from services.common.errors import DeadlineExceeded, InvalidArgument, LoupeError, NotFound, Overloaded, Unavailable, status_for

C = TypeVar("C", bound=type)


def from_rpc_error(exc: grpc.aio.AioRpcError, what: str) -> LoupeError:
    """A backend's status as the matching domain error, prefixed with ``what`` (e.g. "shard 1").

    The backend's own status name stays on the error as ``backend_code`` (for metrics labels:
    a shard answering DATA_LOSS counts as DATA_LOSS although the broker treats it as unavailable).
    """
    code = exc.code()
    msg = f"{what}: {exc.details()}"
    err: LoupeError
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        err = InvalidArgument(exc.details() or msg)  # backends already name the field
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        busy = "concurrent rpc limit" in (exc.details() or "").lower()  # the backend's gRPC admission limit: transient
        err = Overloaded(exc.details() or msg, retry_after_ms=100 if busy else None)
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        err = DeadlineExceeded(msg)
    elif code == grpc.StatusCode.NOT_FOUND:
        err = NotFound(msg)
    else:
        err = Unavailable(msg)
    err.backend_code = code.name  # type: ignore[attr-defined]
    return err


def failure_reason(exc: BaseException) -> str:
    """Label of a backend failure for metrics and logs: the backend's status name when it
    answered one (``UNAVAILABLE``, ``DATA_LOSS``…), the domain error's status otherwise, else the
    exception's type (a local timeout: ``TimeoutError``)."""
    code = getattr(exc, "backend_code", None)
    if code:
        return str(code)
    status = status_for(exc)
    return status.name if status is not None else type(exc).__name__


def translate_rpc_errors(what: Callable[[Any], str], *, skip: tuple[str, ...] = ("refresh", "close")) -> Callable[[C], C]:
    """Class decorator for a backend client: every public coroutine method (but ``skip``)
    raises ``from_rpc_error(exc, what(self))`` instead of a ``grpc.aio.AioRpcError``.

    Methods added to the client later are covered without further change."""

    def wrap(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        async def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return await method(self, *args, **kwargs)
            except grpc.aio.AioRpcError as exc:
                raise from_rpc_error(exc, what(self)) from None

        return call

    def decorate(cls: C) -> C:
        for name, member in list(vars(cls).items()):
            if not name.startswith("_") and name not in skip and inspect.iscoroutinefunction(member):
                setattr(cls, name, wrap(member))
        return cls

    return decorate
