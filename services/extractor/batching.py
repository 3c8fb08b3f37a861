"""Dynamic batching: concurrent callers' items handed to one worker in bounded batches.

A caller's ``submit(item)`` blocks until its result is ready. One worker thread takes the
first waiting item, then gathers more until ``max_items`` are in hand or ``max_wait_s`` has
passed since it took the first, and calls ``run(items)`` once for them. ``run`` returns one
result per item, in order; an item's result may be an exception, which is raised in that
item's caller only (errors stay per item). An exception from ``run`` itself fails the whole
batch. The worker is the only thread that calls ``run``, so ``run`` needs no lock of its own.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_STOP = object()


class Batcher(Generic[T, R]):
    """Gather concurrent ``submit`` calls into batches for one worker thread.

    Parameters
    ----------
    run : callable ``list[T] -> Sequence[R | BaseException]``
        Processes one batch; one result (or exception) per item, in order.
    max_items : int
        Largest batch (>= 1; 1 = no batching, items run one by one in arrival order).
    max_wait_s : float
        Longest the worker waits for more items after taking the first (>= 0).
    on_batch : callable ``(size, waits) -> None``, optional
        Called with the batch size and each item's queue wait (seconds) before ``run``.
    name : str
        Worker thread name.
    """

    def __init__(
        self,
        run: Callable[[list[T]], Sequence[R | BaseException]],
        max_items: int,
        max_wait_s: float,
        on_batch: Callable[[int, list[float]], None] | None = None,
        name: str = "loupe-batcher",
    ) -> None:
        if max_items < 1:
            raise ValueError(f"batch max_items must be >= 1, got {max_items}")
        if not max_wait_s >= 0:
            raise ValueError(f"batch max_wait_s must be >= 0, got {max_wait_s}")
        self._run = run
        self.max_items = max_items
        self.max_wait_s = max_wait_s
        self._on_batch = on_batch
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: T) -> R:
        """Run ``item`` in the next batch and return its result (or raise its exception)."""
        if self._closed:
            raise RuntimeError("batcher is closed")
        fut: Future = Future()
        self._queue.put((item, fut, time.perf_counter()))
        return fut.result()

    def close(self) -> None:
        """Stop the worker after the items already submitted."""
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
            self._thread.join(timeout=10.0)

    def _gather(self, first: tuple) -> tuple[list[tuple], bool]:
        batch, stop = [first], False
        deadline = time.perf_counter() + self.max_wait_s
        while len(batch) < self.max_items:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                try:
                    nxt = self._queue.get(timeout=left)
                except queue.Empty:
                    break
            if nxt is _STOP:
                stop = True
                break
            batch.append(nxt)
        return batch, stop

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch, stop = self._gather(first)
            items = [b[0] for b in batch]
            futures = [b[1] for b in batch]
            started = time.perf_counter()
            try:
                if self._on_batch is not None:
                    self._on_batch(len(items), [started - b[2] for b in batch])
                results = list(self._run(items))
                if len(results) != len(items):
                    raise RuntimeError(f"batch run returned {len(results)} results for {len(items)} items")
            except BaseException as exc:  # noqa: BLE001 - handed to every caller of the batch
                for f in futures:
                    f.set_exception(exc)
            else:
                for f, r in zip(futures, results):
                    if isinstance(r, BaseException):
                        f.set_exception(r)
                    else:
                        f.set_result(r)
            if stop:
                return
