"""ExtractionSlots: searches take freed extraction slots before indexing, each class has its own
waiting bound, and a caller that gives up never leaks a slot (pure asyncio logic)."""

from __future__ import annotations

import asyncio

import pytest

from services.broker.backends import ExtractionSlots


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_a_freed_slot_goes_to_the_waiting_search_before_earlier_indexing() -> None:
    async def run() -> list[str]:
        slots = ExtractionSlots(capacity=1)
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
        slots = ExtractionSlots(capacity=1, max_waiting=1)
        assert not slots.full(False) and not slots.full(True)  # a free slot: nobody is refused
        await slots.acquire(query=False)
        waiter = asyncio.create_task(slots.acquire(query=False))
        await _settle()
        assert slots.full(False)  # indexing's queue is full ...
        assert not slots.full(True)  # ... searches are still admitted
        slots.release()
        await waiter
        slots.release()
        assert slots.in_use == 0

    asyncio.run(run())


@pytest.mark.parametrize("handed_over_first", [False, True])
def test_a_caller_that_gives_up_leaks_no_slot(handed_over_first: bool) -> None:
    async def run() -> None:
        slots = ExtractionSlots(capacity=1)
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
        slots = ExtractionSlots(capacity=1, max_waiting=2)
        await slots.acquire(query=False)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(slots.acquire(query=True), 0.01)
        assert slots.waiting() == 0 and slots.in_use == 1
        slots.release()
        assert slots.in_use == 0

    asyncio.run(run())
