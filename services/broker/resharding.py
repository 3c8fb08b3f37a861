"""Live resharding (the ``Reshard`` rpc): move records to a new shard count without re-extraction.

The steps, while searches and writes go on (``services.broker.routing`` says where each goes):

1. **Start** the new shards' replica sets when growing (``ShardFleet.start``: actors and store
   directories) and empty them of anything an earlier, abandoned reshard left there; install the
   collection whitening on them.
2. **Copy** (phase "copying": writes go to an id's old and new owner with the same version; reads
   use the old placement): every shard lists its ids (``ListVersions``); the live records whose
   owner changes are read (``GetRecords``) and stored on the new owner with a fresh version taken
   after every write routed before it has finished (``InFlight.drain``). So the copy holds each
   write acknowledged before it, and a write after it has a higher version and wins wherever it
   lands (last writer wins, ``services.index.store``); a delete during the move reaches both owners.
   The fresh version also lifts the copy above a tombstone an earlier reshard left on that shard.
3. **Switch** (phase "switched"): every data directory's layout file records the new placement
   (the head's file last: the commit point); reads use the new placement. Writes still go to both
   owners until every request routed before the switch has finished.
4. **Clean** (phase "cleaning": writes go to the new owner only): every shard deletes the records
   it no longer owns. Reads count a record only from its owner under the placement they use, so a
   copy on a second shard is never seen twice (``ReadView.counts``).
5. **Retire** (shrinking): the broker stops asking the shards beyond the new count, waits for the
   reads that may still ask them, and stops them (``ShardFleet.stop``).

Writes are never blocked. A broker that stops mid-reshard (crash, restart) finds the marker
``reshard.json`` in its data directory on its next start and **finishes on the side of the commit
point it stopped on**: the head's layout file says which placement the collection has (the old one
before the switch: a roll back; the new one after it: a roll forward), and that placement's owners
hold every acknowledged write (writes went to both owners up to the cleaning, which follows the
switch). ``recover`` then deletes, on every shard, the records that placement does not give it.
Shards a rolled-back growth had started are not part of the collection; the next growth empties them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

from loupe.v1 import retrieval_pb2, shard_pb2
from services.broker.marker_file import MarkerFile
from services.broker.backends import ShardClient
from services.broker.collection_model import CollectionModel
from services.broker.routing import Routing
from services.broker.versions import VersionClock
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.limits import MAX_WRITE_RECORDS
from services.space.placement import MAX_SHARDS, PLACEMENT_VERSION, Placement

log = logging.getLogger(__name__)

MARKER = "reshard.json"
PAGE = 5000
"""Version entries per ``ListVersions`` page."""


class ShardFleet(Protocol):
    """What the cluster (``cluster.launcher``) does for a reshard: shard processes and layout files."""

    async def start(self, shards: Sequence[int], placement: Placement) -> list[list[str]]:
        """Start the replica sets of ``shards`` (new, for a collection of ``placement``); their
        replicas' addresses (replica j at j), per shard."""
        ...

    async def record_layout(self, placement: Placement) -> None:
        """Record ``placement`` in every data directory's layout file: each shard replica's, then
        the head's (the commit point)."""
        ...

    async def stop(self, shards: Sequence[int]) -> None:
        """Stop the replica sets of ``shards`` (retired) for good."""
        ...


MakeShard = Callable[[int, Sequence[str]], ShardClient]
"""``(shard id, replica addresses) -> client`` (the broker's ``ReplicatedShard`` factory)."""


@dataclass
class ReshardSettings:
    """Per-call timeout of the shard calls a reshard makes, and how long a new replica set may take to answer."""

    timeout_s: float = 60.0


class Resharder:
    """The body of the ``Reshard`` rpc and the recovery at start (see the module docstring).

    Parameters
    ----------
    shards : list of ShardClient
        The broker's own list (index = shard id): grown and cut here, read by everyone else.
    routing, clock, collection :
        The broker's routing, write clock and collection model (marker directory, whitening).
    exclusive : callable
        The lock shared with backups and restores (one collection-wide operation at a time).
    fleet : ShardFleet or None
        None: this broker cannot start or stop shards (FAILED_PRECONDITION).
    make_shard : MakeShard or None
        Client of a new shard's replica set.
    on_retire : callable ``(shard id, replicas) -> None`` or None
        Told when a shard was retired (its metrics series are dropped).
    """

    def __init__(self, shards: list[ShardClient], routing: Routing, clock: VersionClock, collection: CollectionModel,
                 exclusive: Callable[[], asyncio.Lock], fleet: ShardFleet | None = None, make_shard: MakeShard | None = None,
                 settings: ReshardSettings = ReshardSettings(), on_retire: Callable[[int, int], None] | None = None) -> None:
        self.on_retire = on_retire
        self.shards = shards
        self.routing = routing
        self.clock = clock
        self.collection = collection
        self.exclusive = exclusive
        self.fleet = fleet
        self.make_shard = make_shard
        self.settings = settings
        self._marker = MarkerFile(collection.directory, MARKER, "reshard")
        self._running: asyncio.Task[retrieval_pb2.ReshardResponse] | None = None

    # --- the rpc ------------------------------------------------------------------------
    async def reshard(self, request: retrieval_pb2.ReshardRequest) -> retrieval_pb2.ReshardResponse:
        """Move the collection to ``request.shards`` shards and the bucket placement. A caller that
        goes away (cancels, its deadline passes) does not stop it: it runs to its end in the background."""
        if not 1 <= request.shards <= MAX_SHARDS:
            raise InvalidArgument(f"shards: must be 1..{MAX_SHARDS}, got {request.shards}")
        if self.fleet is None or self.make_shard is None:
            raise FailedPrecondition("broker: this broker was started without a cluster that can start and stop shards "
                                     "(`loupe up` provides one); it cannot reshard")
        lock = self.exclusive()  # FAILED_PRECONDITION now when another collection-wide operation runs
        task = asyncio.get_running_loop().create_task(self._reshard(request.shards, lock), name="loupe-reshard")
        self._running = task
        task.add_done_callback(_logged)
        return await asyncio.shield(task)

    async def _reshard(self, shards: int, lock: asyncio.Lock) -> retrieval_pb2.ReshardResponse:
        async with lock:
            await self.recover()  # a reshard that failed midway is finished first
            source, target = self.routing.current, Placement(shards, PLACEMENT_VERSION)
            resp = retrieval_pb2.ReshardResponse(from_shards=source.shards, to_shards=target.shards, from_placement=source.rule,
                                                 to_placement=target.rule)
            if source == target:
                return resp
            t0 = time.monotonic()
            self.routing.resharding = True
            try:
                await self._run(source, target, resp)
            finally:
                self.routing.resharding = False
            resp.seconds = time.monotonic() - t0
        log.warning("resharded %d → %d shards (%s → %s) in %.1f s: %d records moved, %d copies removed", source.shards, target.shards,
                    source.rule, target.rule, resp.seconds, resp.records_moved, resp.copies_removed)
        return resp

    async def _run(self, source: Placement, target: Placement, resp: retrieval_pb2.ReshardResponse) -> None:
        assert self.fleet is not None
        self._marker.set({"from": source.shards, "from_placement": source.rule, "to": target.shards, "to_placement": target.rule})
        timeout = self.settings.timeout_s
        committed = False
        try:
            # 1. start (and empty) the shards the collection does not have yet
            if target.shards > len(self.shards):
                await self._start(target)
            for shard in self.shards[source.shards:target.shards]:
                removed = await self._sweep(shard, lambda _id: False, timeout)
                if removed:
                    log.warning("shard %d held %d records of an abandoned reshard: removed", shard.shard_id, removed)
            # 2. copy
            self.routing.enter("copying", target)
            t_copy = time.monotonic()
            for sid in range(source.shards):
                resp.records_moved += await self._copy(self.shards[sid], target)
            resp.copy_seconds = time.monotonic() - t_copy
            # 3. switch: the layout files first (the head's last: the commit point), then the reads
            await self.fleet.record_layout(target)
            committed = True
            self.routing.enter("switched")
            await self.routing.reads.drain(self.routing.reads.ticket())  # no read still uses the old placement
            # 4. clean: writes go to the new owners only; once those routed before are done, drop the old copies
            self.routing.enter("cleaning")
            await self.routing.writes.drain(self.routing.writes.ticket())
            for sid in range(source.shards):
                resp.copies_removed += await self._sweep(self.shards[sid], lambda image_id, sid=sid: target.shard_of(image_id) == sid,
                                                         timeout)
        except BaseException:
            # before the commit point the old owners hold every write (a roll back), after it the new
            # ones (a roll forward): reads count owners' records only until the next Reshard or start
            # removes the copies left (``recover``)
            self.routing.enter("cleaning", target if committed else source)
            raise
        self.routing.enter("idle")
        await self._retire(target.shards)  # 5. (shrinking)
        self._marker.set(None)

    async def _start(self, target: Placement) -> None:
        """Start shards ``len(shards)..target.shards-1`` and install the collection whitening on them."""
        assert self.fleet is not None and self.make_shard is not None
        new = list(range(len(self.shards), target.shards))
        addresses = await self.fleet.start(new, target)
        clients = [self.make_shard(sid, addrs) for sid, addrs in zip(new, addresses)]
        timeout = self.settings.timeout_s
        for client in clients:
            check = getattr(client, "check", None)  # a replica set decides which replicas are in sync before it is read
            if check is not None:
                await check(timeout)
        payload = self.collection.whitening_payload()
        if payload:
            await asyncio.gather(*(c.set_whitening(shard_pb2.SetWhiteningRequest(shard_id=c.shard_id, whitening=payload), timeout)
                                   for c in clients))
        self.shards.extend(clients)

    async def _retire(self, count: int) -> None:
        """Stop asking (and stop) the shards from ``count`` on, once the reads that may ask them are done."""
        if count >= len(self.shards):
            return
        retired = self.shards[count:]
        del self.shards[count:]
        await self.routing.reads.drain(self.routing.reads.ticket())
        for shard in retired:
            await shard.close()
        if self.fleet is not None:
            await self.fleet.stop([s.shard_id for s in retired])
        if self.on_retire is not None:
            for shard in retired:
                self.on_retire(shard.shard_id, len(getattr(shard, "replicas", [shard])))

    # --- copy and sweep -------------------------------------------------------------------
    async def _copy(self, source: ShardClient, target: Placement) -> int:
        """Copy ``source``'s live records whose owner under ``target`` is another shard there; returns how many."""
        moved, after, timeout = 0, "", self.settings.timeout_s
        while True:
            page = await source.list_versions(shard_pb2.ListVersionsRequest(shard_id=source.shard_id, after=after, limit=PAGE), timeout)
            by_owner: dict[int, list[str]] = {}
            for image_id, deleted in zip(page.ids, page.deleted):
                owner = target.shard_of(image_id)
                if not deleted and owner != source.shard_id:
                    by_owner.setdefault(owner, []).append(image_id)
            for owner, ids in by_owner.items():
                moved += await self._move(source, self.shards[owner], ids)
            if page.done or not page.ids:
                return moved
            after = page.ids[-1]

    async def _move(self, source: ShardClient, owner: ShardClient, ids: list[str]) -> int:
        """Store the live records ``ids`` of ``source`` on ``owner`` with a fresh version, taken once
        every write routed before it has finished (see the module docstring); returns how many."""
        copied, timeout = 0, self.settings.timeout_s
        while ids:
            version = self.clock.next()
            await self.routing.writes.drain(self.routing.writes.ticket())
            resp = await source.get_records(shard_pb2.GetRecordsRequest(shard_id=source.shard_id, ids=ids[:MAX_WRITE_RECORDS]), timeout)
            if resp.consumed < 1:
                raise FailedPrecondition(f"shard {source.shard_id}: GetRecords answered no id of {len(ids)}")
            ids = ids[resp.consumed:]
            if resp.records:  # an answer fits one message, so its records fit one write
                for r in resp.records:
                    r.version = version
                await owner.add(shard_pb2.ShardAddRequest(shard_id=owner.shard_id, records=resp.records), timeout)
                copied += len(resp.records)
        return copied

    async def _sweep(self, shard: ShardClient, keep: Callable[[str], bool], timeout_s: float) -> int:
        """Delete every live record of ``shard`` that ``keep`` rejects; returns how many."""
        removed, after = 0, ""
        while True:
            page = await shard.list_versions(shard_pb2.ListVersionsRequest(shard_id=shard.shard_id, after=after, limit=PAGE), timeout_s)
            doomed = [i for i, deleted in zip(page.ids, page.deleted) if not deleted and not keep(i)]
            for start in range(0, len(doomed), MAX_WRITE_RECORDS):
                chunk = doomed[start:start + MAX_WRITE_RECORDS]
                version = self.clock.next()
                try:
                    r = await shard.delete(shard_pb2.ShardDeleteRequest(shard_id=shard.shard_id, ids=chunk, versions=[version] * len(chunk)),
                                           timeout_s)
                    removed += len(r.deleted)
                except NotFound:  # deleted meanwhile
                    pass
            if page.done or not page.ids:
                return removed
            after = page.ids[-1]

    # --- recovery ---------------------------------------------------------------------------
    async def recover(self) -> int:
        """At start: when a reshard stopped midway (its marker is there), remove from every shard
        the records the collection's placement (the head's layout file) does not give it; reads
        count records from their owners only meanwhile. Returns how many were removed."""
        marker = self._marker.get()
        if marker is None:
            return 0
        placement = self.routing.read  # at start the head's layout; after a failed reshard the side of its commit point
        log.warning("a reshard %s → %s shards stopped midway; the collection has %d shards (%s): removing the copies it left",
                    marker.get("from"), marker.get("to"), placement.shards, placement.rule)
        self.routing.enter("cleaning", placement)
        self.routing.resharding = True
        removed = 0
        try:
            for sid, shard in enumerate(self.shards[: placement.shards]):
                removed += await self._sweep(shard, lambda image_id, sid=sid: placement.shard_of(image_id) == sid, self.settings.timeout_s)
            self.routing.enter("idle")
            await self._retire(placement.shards)
        finally:
            self.routing.resharding = False
        self._marker.set(None)
        log.warning("reshard recovery removed %d copies", removed)
        return removed


def _logged(task: "asyncio.Task[Any]") -> None:
    """Log how a reshard whose caller went away ended (its caller, when still there, gets the same)."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("reshard stopped: %s: %s", type(task.exception()).__name__, task.exception())
