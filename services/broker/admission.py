"""Admission control in the broker: bounded pools of slots, acquire-or-refuse without a race.

One rule for every pool (``Slots``): a caller takes a free slot, or waits in its class's queue,
or — when that queue already holds ``max_waiting`` callers — is refused at once with
RESOURCE_EXHAUSTED and a retry hint (``Overloaded``). The decision is made before the caller's
first await, so concurrent callers cannot all pass a check before any of them is counted.

Two pools use it:

- the extraction slots (``services.broker.backends.ExtractorPool``): images being described,
  searches and indexing in queues of their own (searches take freed slots first);
- the rerank budget (``RerankBudget``): searches whose plan has rerank stages (verification's
  fan-out, diffusion, expansion), each holding its slot from admission to answer, so a search
  that cannot be admitted is refused before its extraction starts; a SearchBatch takes a share.

Each pool's state is exported as ``loupe_admission_{in_use,waiting,capacity,max_waiting}{pool}``
(``BrokerMetrics.observe_slots``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import AsyncIterator, Protocol

from services.common.errors import DeadlineExceeded, Overloaded


class SlotsFull(Exception):
    """A class of callers already has its maximum of waiters (admission refused)."""

    def __init__(self, waiting: int) -> None:
        super().__init__(f"{waiting} callers already wait")
        self.waiting = waiting


class Slots:
    """``capacity`` slots shared by two classes of callers: first (queries) and bulk (indexing).

    A freed slot goes to the longest-waiting first-class caller, then to bulk work, so a stream
    of AddImages calls cannot make searches wait behind it; each class has its own bound on
    waiters (``max_waiting``, 0 = unbounded), so indexing that fills its queue gets
    RESOURCE_EXHAUSTED while searches are still admitted. A pool with one class of callers uses
    the first class only.

    Parameters
    ----------
    capacity : int
        Slots held at once.
    max_waiting : int
        Callers of each class allowed to wait (0 = unbounded).
    name : str
        The pool in messages ("extraction", "rerank").
    setting : str
        The setting that bounds the waiters, named in a refusal (``broker.max_extract_queue``).
    retry_after_ms : int
        Retry hint of a refusal.
    """

    def __init__(self, capacity: int, max_waiting: int = 0, *, name: str = "", setting: str = "", retry_after_ms: int = 100) -> None:
        if capacity < 1:
            raise ValueError(f"slots: capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.max_waiting = max_waiting
        self.name = name
        self.setting = setting
        self.retry_after_ms = retry_after_ms
        self.in_use = 0
        self._waiters: dict[bool, collections.deque[asyncio.Future[None]]] = {True: collections.deque(), False: collections.deque()}

    def waiting(self, query: bool | None = None) -> int:
        """Callers waiting for a slot (of one class, or all)."""
        if query is None:
            return len(self._waiters[True]) + len(self._waiters[False])
        return len(self._waiters[query])

    def try_acquire(self) -> bool:
        """Take a slot only if one is free and nobody waits for it (never waits, never refuses)."""
        if self.in_use < self.capacity and not self.waiting():
            self.in_use += 1
            return True
        return False

    async def acquire(self, query: bool, timeout_s: float | None = None) -> None:
        """Take a slot, or wait for one in the class's queue (first-class callers are handed freed slots first).

        The caller is admitted or refused before the first await, so concurrent callers cannot
        all pass a check before any of them is counted (await this coroutine directly, not
        through a task). Raises ``SlotsFull`` when the class already has ``max_waiting``
        waiters, ``asyncio.TimeoutError`` after ``timeout_s``; a caller that gives up (timeout or
        cancellation) leaves the queue, or passes on a slot handed to it at that very moment.
        """
        if self.try_acquire():
            return
        queue = self._waiters[query]
        if self.max_waiting and len(queue) >= self.max_waiting:
            raise SlotsFull(len(queue))
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.append(fut)
        try:
            await asyncio.wait_for(fut, timeout_s)
        except (asyncio.CancelledError, asyncio.TimeoutError):
            if fut.done() and not fut.cancelled():
                self.release()  # the slot was handed over just as the caller gave up: pass it on
            elif fut in queue:
                queue.remove(fut)
            raise

    async def admit(self, query: bool, timeout_s: float | None, what: str) -> None:
        """``acquire`` with loupe's errors: ``Overloaded`` (RESOURCE_EXHAUSTED with the retry hint,
        naming ``what`` waits and the setting) when the class's queue is full, ``DeadlineExceeded``
        when the caller's time ran out while waiting. Admitted or refused before the first await."""
        try:
            await self.acquire(query, timeout_s)
        except SlotsFull as full:
            raise Overloaded(
                f"{full.waiting} {what} wait for {self.capacity} {self.name} slots, the limit is {self.setting}={self.max_waiting}; "
                f"retry after {self.retry_after_ms} ms",
                retry_after_ms=self.retry_after_ms,
            ) from None
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"deadline exceeded while waiting for a {self.name} slot") from None

    def release(self) -> None:
        """Hand the slot to the next waiter (first class first) or free it."""
        for cls in (True, False):
            queue = self._waiters[cls]
            while queue:
                fut = queue.popleft()
                if not fut.done():
                    fut.set_result(None)
                    return
        self.in_use -= 1


class _Remaining(Protocol):
    def remaining(self) -> float: ...


class RerankBudget:
    """The broker's bound on rerank work: searches with rerank stages in flight and waiting.

    A search whose plan reranks holds one slot from its admission (before extraction or the
    stored-features read) until it is answered; beyond ``slots`` in flight it waits in a queue of
    at most ``max_waiting``, beyond that it is refused at once (RESOURCE_EXHAUSTED, retry hint).
    A SearchBatch takes a share (``hold_batch``).
    """

    def __init__(self, slots: int, max_waiting: int, retry_after_ms: int) -> None:
        self.slots = Slots(slots, max_waiting, name="rerank", setting="broker.max_rerank_queue", retry_after_ms=retry_after_ms)

    @property
    def batch_share(self) -> int:
        """Most slots one SearchBatch holds: half the budget (at least one)."""
        return max(1, self.slots.capacity // 2)

    @contextlib.asynccontextmanager
    async def hold(self, reranks: bool, deadline: _Remaining) -> AsyncIterator[None]:
        """A search's slot for the block (none when ``reranks`` is False); refused or admitted at entry."""
        if not reranks:
            yield
            return
        await self.slots.admit(True, deadline.remaining(), "searches with rerank stages")
        try:
            yield
        finally:
            self.slots.release()

    @contextlib.asynccontextmanager
    async def hold_batch(self, reranking: int, deadline: _Remaining) -> AsyncIterator[asyncio.Semaphore]:
        """A batch's share for the block: its first slot admitted like a search (so a batch is
        refused before any of its extraction), then up to ``batch_share`` slots in all — never
        more than ``reranking`` (its queries with rerank stages) — taken only where free now.

        Yields a semaphore of as many permits as slots held: each reranking query of the batch
        runs its stages under one permit."""
        if reranking <= 0:
            yield asyncio.Semaphore(1)
            return
        await self.slots.admit(True, deadline.remaining(), "searches with rerank stages")
        held = 1
        try:
            while held < min(reranking, self.batch_share) and self.slots.try_acquire():
                held += 1
            yield asyncio.Semaphore(held)
        finally:
            for _ in range(held):
                self.slots.release()
