"""Admission slots (services/broker/admission.py): searches take freed extraction slots before indexing, each class has its own
waiting bound, and a caller that gives up never leaks a slot (pure asyncio logic)."""

from __future__ import annotations

import asyncio

import pytest

from services.broker.admission import RerankBudget, Slots, SlotsFull
from services.common.errors import DeadlineExceeded, Overloaded


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_a_freed_slot_goes_to_the_waiting_search_before_earlier_indexing() -> None:
    async def run() -> list[str]:
        slots = Slots(capacity=1)
        await slots.acquire(query=False)  # indexing holds the only slot
        order: list[str] = []

        async def worker(name: str, query: bool) -> None:
            await slots.acquire(query)
            order.append(name)
            await asyncio.sleep(0)
            slots.release()

        tasks = [asyncio.create_task(worker("index-a", False)), asyncio.create_task(worker("index-b", False))]
        await _settle()
        tasks.append(asyncio.create_task(worker("search", True)))
        await _settle()
        assert slots.waiting() == 3 and slots.waiting(True) == 1
        slots.release()
        await asyncio.gather(*tasks)
        assert slots.in_use == 0 and slots.waiting() == 0
        return order

    assert asyncio.run(run()) == ["search", "index-a", "index-b"]


def test_each_class_has_its_own_waiting_bound() -> None:
    async def run() -> None:
        slots = Slots(capacity=1, max_waiting=1)
        await slots.acquire(query=False)  # a free slot: taken at once
        waiter = asyncio.create_task(slots.acquire(query=False))
        await _settle()
        with pytest.raises(SlotsFull):  # indexing's queue is full ...
            await slots.acquire(query=False)
        searcher = asyncio.create_task(slots.acquire(query=True))  # ... searches are still admitted
        await _settle()
        assert slots.waiting(True) == 1
        slots.release()  # the search goes first
        await searcher
        slots.release()
        await waiter
        slots.release()
        assert slots.in_use == 0

    asyncio.run(run())


def test_a_burst_admits_no_more_than_the_bound() -> None:
    """400 concurrent callers: at most capacity + max_waiting are admitted, the rest refused at
    once (the old check-then-wait admitted every caller that checked before the first one queued)."""

    async def run() -> tuple[int, int, int]:
        slots = Slots(capacity=4, max_waiting=8)
        admitted = refused = peak = 0

        async def caller() -> None:
            nonlocal admitted, refused, peak
            try:
                await slots.acquire(query=True, timeout_s=5.0)
            except SlotsFull:
                refused += 1
                return
            admitted += 1
            peak = max(peak, slots.waiting())
            await asyncio.sleep(0.001)
            slots.release()

        await asyncio.gather(*(caller() for _ in range(400)))
        assert slots.in_use == 0 and slots.waiting() == 0
        return admitted, refused, peak

    admitted, refused, peak = asyncio.run(run())
    assert admitted == 12 and refused == 388 and peak <= 8


def test_a_waiter_that_times_out_leaves_the_queue() -> None:
    async def run() -> None:
        slots = Slots(capacity=1)
        await slots.acquire(query=True)
        with pytest.raises(asyncio.TimeoutError):
            await slots.acquire(query=True, timeout_s=0.05)
        assert slots.waiting() == 0
        slots.release()
        assert slots.in_use == 0

    asyncio.run(run())


@pytest.mark.parametrize("handed_over_first", [False, True])
def test_a_caller_that_gives_up_leaks_no_slot(handed_over_first: bool) -> None:
    async def run() -> None:
        slots = Slots(capacity=1)
        await slots.acquire(query=True)
        quitter = asyncio.create_task(slots.acquire(query=True))
        patient = asyncio.create_task(slots.acquire(query=False))
        await _settle()
        if handed_over_first:
            slots.release()  # the slot is handed to the quitter, which is cancelled before it runs
        quitter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await quitter
        if not handed_over_first:
            assert slots.waiting() == 1
            slots.release()
        await asyncio.wait_for(patient, 1.0)  # the slot reached the remaining waiter
        assert slots.in_use == 1
        slots.release()
        assert slots.in_use == 0 and slots.waiting() == 0

    asyncio.run(run())


def test_timeouts_through_wait_for_leave_the_queue_clean() -> None:
    async def run() -> None:
        slots = Slots(capacity=1, max_waiting=2)
        await slots.acquire(query=False)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(slots.acquire(query=True), 0.01)
        assert slots.waiting() == 0 and slots.in_use == 1
        slots.release()
        assert slots.in_use == 0

    asyncio.run(run())


def test_admit_refuses_with_the_setting_and_a_retry_hint() -> None:
    async def run() -> None:
        slots = Slots(capacity=1, max_waiting=1, name="rerank", setting="broker.max_rerank_queue", retry_after_ms=250)
        await slots.admit(True, None, "searches")
        waiter = asyncio.create_task(slots.admit(True, None, "searches"))
        await _settle()
        with pytest.raises(Overloaded) as refused:
            await slots.admit(True, None, "searches")
        assert refused.value.retry_after_ms == 250
        assert str(refused.value) == "1 searches wait for 1 rerank slots, the limit is broker.max_rerank_queue=1; retry after 250 ms"
        with pytest.raises(Overloaded):  # the other class has no room either once its queue is full
            await slots.admit(True, 5.0, "searches")
        slots.release()
        await waiter
        with pytest.raises(DeadlineExceeded):
            await slots.admit(True, 0.01, "searches")
        slots.release()
        assert slots.in_use == 0 and slots.waiting() == 0

    asyncio.run(run())


class _Deadline:
    def remaining(self) -> float:
        return 5.0


def test_the_rerank_budget_bounds_a_burst_and_skips_searches_without_stages() -> None:
    """400 concurrent reranking searches: never more than ``slots`` hold one at once, at most
    slots + queue are admitted, every other one is refused at once; plain searches take none."""

    async def run() -> tuple[int, int, int]:
        budget = RerankBudget(slots=4, max_waiting=8, retry_after_ms=100)
        admitted = refused = peak = 0

        async def search(reranks: bool) -> None:
            nonlocal admitted, refused, peak
            try:
                async with budget.hold(reranks, _Deadline()):
                    if reranks:
                        admitted += 1
                        peak = max(peak, budget.slots.in_use)
                    else:
                        assert budget.slots.in_use <= 4
                    await asyncio.sleep(0.001)
            except Overloaded:
                refused += 1

        await asyncio.gather(*(search(i % 5 != 4) for i in range(400)))
        assert budget.slots.in_use == 0 and budget.slots.waiting() == 0
        return admitted, refused, peak

    admitted, refused, peak = asyncio.run(run())
    assert (admitted, refused, peak) == (12, 308, 4)


def test_a_batch_takes_its_first_slot_like_a_search_and_only_free_ones_beyond() -> None:
    async def run() -> None:
        budget = RerankBudget(slots=4, max_waiting=1, retry_after_ms=100)
        assert budget.batch_share == 2
        async with budget.hold_batch(10, _Deadline()):
            assert budget.slots.in_use == 2  # half the budget, not one slot per query
            async with budget.hold_batch(1, _Deadline()):
                assert budget.slots.in_use == 3  # never more than its reranking queries
                async with budget.hold(True, _Deadline()):
                    assert budget.slots.in_use == 4
                    entered = []

                    async def waiting_batch() -> None:
                        async with budget.hold_batch(3, _Deadline()):
                            entered.append(budget.slots.in_use)

                    task = asyncio.create_task(waiting_batch())
                    await _settle()
                    assert budget.slots.waiting() == 1 and not entered
                    with pytest.raises(Overloaded):  # the queue is full: refused before any of its work
                        async with budget.hold_batch(3, _Deadline()):
                            pass
                await task  # the freed slot went to the waiting batch, which found no other free one
                assert entered == [4]
        assert budget.slots.in_use == 0 and budget.slots.waiting() == 0
        async with budget.hold_batch(0, _Deadline()):  # no reranking query: no slot
            assert budget.slots.in_use == 0

    asyncio.run(run())
