"""Channels to named cluster members whose address can change, and hedged calls across replicas.

A member (a shard, an extractor replica) is known by name; the registry maps the name to its
current ``host:port``. Ray restarts a dead actor wherever its resources are, often on another
port or another node's IP, and re-registers it. A :class:`MemberChannel` therefore never keeps
an address for life: a call that fails with UNAVAILABLE or DEADLINE_EXCEEDED, or a failed health
check, makes it look the name up again (at most every ``min_refresh_s``); a new address replaces
the channel (the old one is closed after in-flight calls had a moment to finish).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

import grpc

log = logging.getLogger(__name__)
T = TypeVar("T")
S = TypeVar("S")

Resolve = Callable[[], Awaitable["str | None"]]
"""Looks a member's current address up (None: not registered)."""


class MemberChannel(Generic[S]):
    """A gRPC channel to one named member that follows the member's address.

    Parameters
    ----------
    name : str
        For logs, e.g. "shard 1".
    address : str
        The address known at start-up.
    open_channel : callable ``(address) -> grpc.aio.Channel``
    make_stub : callable ``(channel) -> stub``
    resolve : Resolve or None
        Registry lookup of the member's address; None = a fixed address.
    min_refresh_s : float
        Shortest time between two lookups.
    on_move : callable or None
        Called after the channel moved to a new address (metrics).
    """

    def __init__(self, name: str, address: str, open_channel: Callable[[str], grpc.aio.Channel], make_stub: Callable[[grpc.aio.Channel], S],
                 resolve: Resolve | None = None, min_refresh_s: float = 0.5, on_move: Callable[[], None] | None = None) -> None:
        self.name = name
        self.address = address
        self._open = open_channel
        self._make_stub = make_stub
        self._resolve = resolve
        self.min_refresh_s = min_refresh_s
        self._channel = open_channel(address)
        self.stub: S = make_stub(self._channel)
        self._last_refresh = float("-inf")
        self._refreshing: asyncio.Future[bool] | None = None
        self._background_tasks: set[asyncio.Task] = set()
        self._on_move = on_move

    @property
    def channel(self) -> grpc.aio.Channel:
        """The channel to the current address (for stubs of other services, e.g. health)."""
        return self._channel

    async def refresh(self) -> bool:
        """Look the address up again; returns True if it changed (the channel was replaced).

        Concurrent callers share one lookup; lookups closer than ``min_refresh_s`` return False."""
        if self._resolve is None:
            return False
        if self._refreshing is not None:
            return await asyncio.shield(self._refreshing)
        if time.monotonic() - self._last_refresh < self.min_refresh_s:
            return False
        self._last_refresh = time.monotonic()
        self._refreshing = asyncio.get_running_loop().create_future()
        moved = False
        try:
            address = await self._resolve()
            if address and address != self.address:
                log.warning("%s moved: %s -> %s", self.name, self.address, address)
                old = self._channel
                self._channel = self._open(address)
                self.stub = self._make_stub(self._channel)
                self.address = address
                moved = True
                if self._on_move is not None:
                    self._on_move()
                self._background(old.close(grace=1.0))
        except Exception as exc:  # registry unreachable: keep the current address, try again later
            log.warning("%s: address lookup failed (%s: %s)", self.name, type(exc).__name__, exc)
        finally:
            self._refreshing.set_result(moved)
            self._refreshing = None
        return moved

    async def call(self, invoke: Callable[[S, float], Awaitable[T]], timeout_s: float) -> T:
        """``invoke(stub, timeout_s)``; on UNAVAILABLE, look the member up and, if it moved, call
        the new address once with the time left. DEADLINE_EXCEEDED starts a lookup in the
        background (no time is left to retry)."""
        t0 = time.monotonic()
        try:
            return await invoke(self.stub, timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                self.refresh_soon()
                raise
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            left = timeout_s - (time.monotonic() - t0)
            if not await self.refresh() or left <= 0.01:
                raise
            return await invoke(self.stub, left)

    def refresh_soon(self) -> None:
        """Start a lookup without waiting for it."""
        if self._resolve is None:
            return
        self._background(self.refresh())

    def _background(self, work: Awaitable[Any]) -> None:
        """Run ``work`` as a task this channel keeps until it ends (``close`` cancels it)."""
        task = asyncio.get_running_loop().create_task(work)  # type: ignore[arg-type]
        self._background_tasks.add(task)
        task.add_done_callback(self._background_tasks.discard)

    async def close(self) -> None:
        for task in list(self._background_tasks):
            task.cancel()
        await self._channel.close()


async def hedged(
    attempts: Sequence[Callable[[float], Awaitable[T]]],
    timeout_s: float,
    hedge_after_s: float = 0.0,
    retryable: Callable[[BaseException], bool] = lambda exc: True,
) -> T:
    """The first successful answer of ``attempts`` (each called with the time left), in order.

    The next attempt starts when the running ones have all failed with a ``retryable`` error,
    or — hedging, when ``hedge_after_s`` > 0 — when none answered within ``hedge_after_s`` of
    the last start. The others are cancelled once one answers. A non-retryable error is raised
    at once; when every attempt failed, the last error is raised; when time runs out first,
    ``asyncio.TimeoutError``.
    """
    if not attempts:
        raise ValueError("hedged: no attempts")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    pending: set[asyncio.Task[T]] = set()
    started = 0
    last_start = loop.time()
    last_error: BaseException | None = None

    def start() -> None:
        nonlocal started, last_start
        pending.add(loop.create_task(attempts[started](max(0.001, deadline - loop.time()))))
        started += 1
        last_start = loop.time()

    start()
    try:
        while pending:
            now = loop.time()
            wait = deadline - now
            can_hedge = hedge_after_s > 0 and started < len(attempts)
            if can_hedge:
                wait = min(wait, last_start + hedge_after_s - now)
            if wait <= 0 and not can_hedge:
                break
            done, pending = await asyncio.wait(pending, timeout=max(wait, 0), return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = task.exception()
                if exc is None:
                    return task.result()
                if not retryable(exc):
                    raise exc
                last_error = exc
            if loop.time() >= deadline:
                break
            if started < len(attempts) and (not pending or (not done and can_hedge)):
                start()  # fail over at once, or hedge a slow attempt
        if last_error is not None and loop.time() < deadline:
            raise last_error
        raise asyncio.TimeoutError(f"no answer within {timeout_s:.3f} s" + (f" (last error: {last_error})" if last_error else ""))
    finally:
        for task in pending:
            task.cancel()
        # consume cancelled tasks' exceptions so none is reported as never retrieved
        for task in pending:
            task.add_done_callback(_swallow)


def _swallow(task: "asyncio.Task[Any]") -> None:
    if not task.cancelled():
        task.exception()
