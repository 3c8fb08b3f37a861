"""Where the broker sends each read and write: the collection's placement, and during a reshard
the placement it moves to.

Outside a reshard one ``Placement`` decides everything. A reshard (``services.broker.resharding``)
walks ``Routing`` through its phases:

=========== ======================= ========================== ===========================
phase       reads (owner, fan-out)  writes go to               hits/listings counted from
=========== ======================= ========================== ===========================
idle        current                 current owner              every shard read
copying     current                 current and target owners  the current owner only
switched    target                  current and target owners  the target owner only
cleaning    target                  target owner               the target owner only
=========== ======================= ========================== ===========================

A record may sit on two shards during a reshard (copied, not yet removed from its old shard);
reads count it only from the owner under the placement reads use, so an answer holds it once,
and never misses it: before the switch the old owner holds every write (writes go to both), after
it the new owner does (everything was copied, and writes still go to both until the switch is
behind every request). A read takes its ``ReadView`` once, when it starts, and keeps it; ``InFlight``
lets the resharder wait for the reads and writes that started under an earlier phase.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from dataclasses import dataclass
from typing import Iterator, Sequence, TypeVar

from services.space.placement import Placement

T = TypeVar("T")
PHASES = ("idle", "copying", "switched", "cleaning")


class InFlight:
    """Operations in progress, each with a ticket taken when it started (its routing decided)."""

    def __init__(self) -> None:
        self._tickets = itertools.count(1)
        self._running: set[int] = set()
        self._done = asyncio.Event()

    @contextlib.contextmanager
    def running(self) -> Iterator[int]:
        """Register an operation for its duration; yields its ticket."""
        ticket = next(self._tickets)
        self._running.add(ticket)
        try:
            yield ticket
        finally:
            self._running.discard(ticket)
            self._done.set()

    def ticket(self) -> int:
        """A ticket above every operation started so far."""
        return next(self._tickets)

    async def drain(self, before: int) -> None:
        """Wait until every operation with a ticket below ``before`` has ended."""
        while any(t < before for t in self._running):
            self._done.clear()
            await self._done.wait()


@dataclass(frozen=True)
class ReadView:
    """Where one read goes, fixed when it starts (a reshard may switch while it runs; the read then
    finishes on the side it started on, whose shards keep the records until it has ended)."""

    placement: Placement
    filtering: bool

    def owner(self, image_id: str) -> int:
        """The shard reads of ``image_id`` go to."""
        return self.placement.shard_of(image_id)

    def read_shards(self, shards: Sequence[T]) -> list[T]:
        """The shards a fan-out asks: those of the read placement."""
        return list(shards[: self.placement.shards])

    def counts(self, shard_id: int, image_id: str) -> bool:
        """Whether ``image_id`` found on ``shard_id`` counts (its owner, while a reshard runs)."""
        return not self.filtering or self.owner(image_id) == shard_id


class Routing:
    """The broker's placement (and a reshard's target); see the module docstring.

    Attributes
    ----------
    current : Placement
        The collection's placement (what the layout files record until a reshard's switch).
    target : Placement or None
        Where a running reshard moves records to.
    phase : str
        One of ``PHASES``.
    resharding : bool
        Whether a reshard runs (also while it starts or retires shards, in phase "idle"): the
        collection-wide model operations (FitWhitening, BuildGraph) wait for it to end.
    reads, writes : InFlight
        Requests in progress, for the resharder's waits.
    """

    def __init__(self, placement: Placement) -> None:
        self.current = placement
        self.target: Placement | None = None
        self.phase = "idle"
        self.resharding = False  # a reshard (or its recovery) runs, from its first step to its last
        self.reads = InFlight()
        self.writes = InFlight()

    @property
    def read(self) -> Placement:
        """The placement reads use: the target from the switch on."""
        return self.target if self.target is not None and self.phase in ("switched", "cleaning") else self.current

    @property
    def filtering(self) -> bool:
        """Whether a shard may hold records it does not own (copies of a running reshard)."""
        return self.phase != "idle"

    def view(self) -> ReadView:
        """Where a read starting now goes: take it once per read and keep it."""
        return ReadView(self.read, self.filtering)

    def owner(self, image_id: str) -> int:
        """The shard reads of ``image_id`` go to now."""
        return self.read.shard_of(image_id)

    def write_owners(self, image_id: str) -> tuple[int, ...]:
        """The shards a write of ``image_id`` goes to (two while a reshard copies and switches)."""
        if self.target is not None and self.phase in ("copying", "switched"):
            a, b = self.current.shard_of(image_id), self.target.shard_of(image_id)
            return (a,) if a == b else (a, b)
        return (self.owner(image_id),)

    def enter(self, phase: str, target: Placement | None = None) -> None:
        """Move to ``phase`` (from "idle": with its ``target``); "idle" makes the target current."""
        assert phase in PHASES, phase
        if target is not None:
            self.target = target
        assert phase == "idle" or self.target is not None
        if phase == "idle" and self.target is not None:
            self.current, self.target = self.target, None
        self.phase = phase
