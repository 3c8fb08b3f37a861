"""Versions of writes: the broker's clock that orders every write of an id across replicas.

Each write (an AddImages batch, a Delete) gets one version; every replica keeps, per id, the
write with the highest version it received (``services.index.store``: last writer wins), so
replicas that saw the same writes in any order, or copied records from each other, agree.

A version is a hybrid logical clock: milliseconds since the epoch in the high bits, a counter
in the low 20 bits. It only grows, also across a broker restart (the wall clock has moved on)
and past a clock that stepped back: ``observe`` lifts it above any version a shard reports.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

_COUNTER_BITS = 20


class VersionClock:
    """Strictly increasing 64-bit write versions (thread-safe)."""

    def __init__(self, now_ms: Callable[[], int] | None = None) -> None:
        self._now_ms = now_ms or (lambda: int(time.time() * 1000))
        self._last = 0
        self._lock = threading.Lock()

    def next(self) -> int:
        """A version greater than every version this clock has issued or observed."""
        with self._lock:
            self._last = max(self._last + 1, self._now_ms() << _COUNTER_BITS)
            return self._last

    def observe(self, version: int) -> None:
        """Never issue ``version`` or anything below it (a shard holds writes up to it)."""
        with self._lock:
            self._last = max(self._last, version)
