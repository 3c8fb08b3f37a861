"""Placement rules, the broker's routing phases and the resharder's copy/clean protocol over
in-memory versioned shards (pure logic; the real cluster is in tests/integration/test_reshard.py)."""

from __future__ import annotations

import asyncio
import random

import pytest

from loupe.v1 import retrieval_pb2, shard_pb2
from services.broker.collection_model import CollectionModel
from services.broker.resharding import MARKER, Resharder
from services.broker.routing import Routing
from services.broker.versions import VersionClock
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.space.layout import Layout, LayoutMismatch, check_layout, read_layout
from services.space.placement import BUCKETS, LEGACY_PLACEMENT, PLACEMENT_VERSION, Placement, bucket_of, shard_for

IDS = [f"img-{i:06d}" for i in range(20000)]


# --- placement ---------------------------------------------------------------------------
def test_adding_a_shard_moves_about_its_share_and_only_onto_it() -> None:
    for n in (1, 2, 3, 7):
        a, b = Placement(n), Placement(n + 1)
        moved = [i for i in IDS if a.shard_of(i) != b.shard_of(i)]
        assert all(b.shard_of(i) == n for i in moved)  # only onto the new shard
        assert abs(len(moved) / len(IDS) - 1 / (n + 1)) < 0.03, (n, len(moved) / len(IDS))
    legacy = sum(shard_for(i, 2) != shard_for(i, 3) for i in IDS) / len(IDS)
    assert legacy > 0.6  # what the bucket rule replaces: digest mod S moves about 2/3 going 2 → 3


def test_removing_the_last_shard_moves_only_its_records_back_where_they_were() -> None:
    two, three = Placement(2), Placement(3)
    for i in IDS:
        if three.shard_of(i) != 2:
            assert two.shard_of(i) == three.shard_of(i)
    counts = [sum(three.shard_of(i) == s for i in IDS) for s in range(3)]
    assert min(counts) > 0.28 * len(IDS)  # balanced within a few percent of 1/3


def test_placement_rules_names_and_bounds() -> None:
    legacy = Placement(3, LEGACY_PLACEMENT)
    assert [legacy.shard_of(i) for i in IDS[:50]] == [shard_for(i, 3) for i in IDS[:50]]
    assert Placement(3) == Placement(3, PLACEMENT_VERSION) and Placement(3) != legacy
    assert 0 <= bucket_of("x") < BUCKETS and Placement(1).shard_of("x") == 0
    with pytest.raises(ValueError, match="shards"):
        Placement(0)
    with pytest.raises(ValueError, match="unknown rule"):
        Placement(2, "ring-v9")


def test_a_legacy_directory_keeps_its_rule_and_a_shard_directory_any_count(tmp_path) -> None:
    check_layout(tmp_path, Layout(shards=2, placement=LEGACY_PLACEMENT))
    assert check_layout(tmp_path, Layout(shards=2, placement="")).placement == LEGACY_PLACEMENT
    assert check_layout(tmp_path / "new", Layout(shards=2, placement="")).placement == PLACEMENT_VERSION
    check_layout(tmp_path / "s1", Layout(shards=2, shard=1, replica=0))
    assert check_layout(tmp_path / "s1", Layout(shards=3, placement="", shard=1, replica=0), check_count=False).shards == 2
    with pytest.raises(LayoutMismatch, match="holds shard 1"):
        check_layout(tmp_path / "s1", Layout(shards=3, placement="", shard=0, replica=0), check_count=False)
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "layout.json").write_text('{"shards": 2, "placement": "ring-v9"}')
    with pytest.raises(LayoutMismatch, match="ring-v9"):
        check_layout(tmp_path / "odd", Layout(shards=2, placement=""))


# --- routing -------------------------------------------------------------------------------
def test_routing_phases_send_writes_to_both_owners_and_count_reads_once() -> None:
    r = Routing(Placement(2))
    mover = next(i for i in IDS if Placement(3).shard_of(i) == 2)
    old = Placement(2).shard_of(mover)
    assert r.write_owners(mover) == (old,) and r.view().counts(2, mover) and r.view().read_shards([0, 1, 2]) == [0, 1]
    r.enter("copying", Placement(3))
    before = r.view()
    assert r.write_owners(mover) == (old, 2) and r.owner(mover) == old and before.read_shards([0, 1, 2]) == [0, 1]
    assert before.counts(old, mover) and not before.counts(2, mover)
    r.enter("switched")
    assert r.write_owners(mover) == (old, 2) and r.owner(mover) == 2 and r.view().read_shards([0, 1, 2]) == [0, 1, 2]
    assert not r.view().counts(old, mover) and r.view().counts(2, mover)
    assert before.counts(old, mover) and before.owner(mover) == old  # a read keeps the side it started on
    r.enter("cleaning")
    assert r.write_owners(mover) == (2,)
    r.enter("idle")
    assert r.current == Placement(3) and r.target is None and r.view().counts(old, mover)


def test_in_flight_drain_waits_for_earlier_operations_only() -> None:
    async def main() -> None:
        r = Routing(Placement(1))
        release = asyncio.Event()

        async def op() -> None:
            with r.writes.running():
                await release.wait()

        task = asyncio.ensure_future(op())
        await asyncio.sleep(0)
        ticket = r.writes.ticket()
        later = asyncio.ensure_future(op())
        await asyncio.sleep(0)
        drained = asyncio.ensure_future(r.writes.drain(ticket))
        await asyncio.sleep(0.01)
        assert not drained.done()
        release.set()
        await asyncio.wait_for(drained, 1.0)
        await asyncio.gather(task, later)

    asyncio.run(main())


# --- the resharder over in-memory shards ---------------------------------------------------------
class VersionedShard:
    """A shard's write rules in memory: last writer wins by version (strictly newer), deletes leave tombstones."""

    def __init__(self, shard_id: int) -> None:
        self.shard_id = shard_id
        self.held: dict[str, tuple[int, str | None]] = {}  # id → (version, payload; None = deleted)
        self.whitening = b""
        self.closed = False

    async def _tick(self) -> None:
        await asyncio.sleep(random.random() * 0.002)  # calls interleave as on real shards

    def _apply(self, image_id: str, version: int, payload: str | None) -> bool:
        held = self.held.get(image_id)
        if held is not None and held[0] >= version:
            return False
        self.held[image_id] = (version, payload)
        return True

    def live(self) -> dict[str, str]:
        return {i: p for i, (_, p) in self.held.items() if p is not None}

    async def add(self, req: shard_pb2.ShardAddRequest, timeout_s: float) -> shard_pb2.ShardAddResponse:
        await self._tick()
        for r in req.records:
            self._apply(r.id, r.version, r.metadata["p"])
        return shard_pb2.ShardAddResponse(stored=len(req.records), replicas=1)

    async def delete(self, req: shard_pb2.ShardDeleteRequest, timeout_s: float) -> shard_pb2.ShardDeleteResponse:
        await self._tick()
        resp = shard_pb2.ShardDeleteResponse(replicas=1)
        for image_id, version in zip(req.ids, req.versions):
            existed = image_id in self.live()
            if self._apply(image_id, version, None) and existed:
                resp.deleted.append(image_id)
            else:
                resp.missing.append(image_id)
        if not resp.deleted:
            raise NotFound("none")
        return resp

    async def list_versions(self, req: shard_pb2.ListVersionsRequest, timeout_s: float) -> shard_pb2.ListVersionsResponse:
        await self._tick()
        ids = sorted(i for i in self.held if i > req.after)
        resp = shard_pb2.ListVersionsResponse(done=len(ids) <= req.limit)
        for i in ids[: req.limit]:
            resp.ids.append(i)
            resp.versions.append(self.held[i][0])
            resp.deleted.append(self.held[i][1] is None)
        return resp

    async def get_records(self, req: shard_pb2.GetRecordsRequest, timeout_s: float) -> shard_pb2.GetRecordsResponse:
        await self._tick()
        ids = list(req.ids)[:7]
        live = self.live()
        return shard_pb2.GetRecordsResponse(
            records=[shard_pb2.ShardRecord(id=i, version=self.held[i][0], metadata={"p": live[i]}) for i in ids if i in live],
            consumed=len(ids))

    async def set_whitening(self, req: shard_pb2.SetWhiteningRequest, timeout_s: float) -> shard_pb2.SetWhiteningResponse:
        self.whitening = req.whitening
        return shard_pb2.SetWhiteningResponse()

    async def close(self) -> None:
        self.closed = True


class MemFleet:
    """Starts and stops ``VersionedShard``s, keeps their stores (a restarted growth finds them again)."""

    def __init__(self) -> None:
        self.stores: dict[int, VersionedShard] = {}
        self.layouts: list[Placement] = []
        self.stopped: list[int] = []

    async def start(self, shards, placement):
        return [[f"mem:{i}"] for i in shards]

    def make(self, sid: int, addresses) -> VersionedShard:
        return self.stores.setdefault(sid, VersionedShard(sid))

    async def record_layout(self, placement: Placement) -> None:
        self.layouts.append(placement)

    async def stop(self, shards) -> None:
        self.stopped.extend(shards)


class Cluster:
    """The broker's side in memory: shards, routing, clock, a resharder; writes route as ``Writer`` does."""

    def __init__(self, tmp_path, n: int = 2) -> None:
        self.fleet = MemFleet()
        self.shards = [self.fleet.make(i, []) for i in range(n)]
        self.routing = Routing(Placement(n))
        self.clock = VersionClock()
        self.lock = asyncio.Lock()

        def exclusive() -> asyncio.Lock:  # as the broker's: refused at once while taken
            if self.lock.locked():
                raise FailedPrecondition("a backup, restore or reshard is already running")
            return self.lock

        self.resharder = Resharder(self.shards, self.routing, self.clock, CollectionModel(str(tmp_path)), exclusive,
                                   self.fleet, self.fleet.make)
        self.truth: dict[str, str] = {}  # acknowledged state

    async def put(self, image_id: str, payload: str) -> None:
        with self.routing.writes.running():
            version = self.clock.next()
            await asyncio.gather(*(self.shards[s].add(shard_pb2.ShardAddRequest(
                shard_id=s, records=[shard_pb2.ShardRecord(id=image_id, version=version, metadata={"p": payload})]), 1.0)
                for s in self.routing.write_owners(image_id)))
        self.truth[image_id] = payload

    async def remove(self, image_id: str) -> None:
        with self.routing.writes.running():
            version = self.clock.next()
            await asyncio.gather(*(self.shards[s].delete(shard_pb2.ShardDeleteRequest(shard_id=s, ids=[image_id], versions=[version]), 1.0)
                                   for s in self.routing.write_owners(image_id)), return_exceptions=True)
        self.truth.pop(image_id, None)

    def visible(self) -> dict[str, str]:
        """What a search sees: every read shard's records that it counts (each id at most once)."""
        seen: dict[str, str] = {}
        view = self.routing.view()
        for shard in view.read_shards(self.shards):
            for image_id, payload in shard.live().items():
                if view.counts(shard.shard_id, image_id):
                    assert image_id not in seen, f"{image_id} counted twice"
                    seen[image_id] = payload
        return seen


def test_reshard_2_3_2_under_writes_and_deletes_converges(tmp_path) -> None:
    async def main() -> None:
        random.seed(3)
        c = Cluster(tmp_path)
        for i in range(300):
            await c.put(f"id-{i:04d}", "v0")
        stop = asyncio.Event()
        checks = 0

        async def load() -> None:
            nonlocal checks
            n = 300
            while not stop.is_set():
                op = random.random()
                if op < 0.4:
                    await c.put(f"id-{n:04d}", "new")
                    n += 1
                elif op < 0.7:
                    await c.put(f"id-{random.randrange(n):04d}", f"upd{n}")
                else:
                    await c.remove(f"id-{random.randrange(n):04d}")
                # between two writes: what reads see is exactly the acknowledged state
                assert c.visible() == c.truth
                checks += 1

        task = asyncio.ensure_future(load())
        up = await c.resharder.reshard(retrieval_pb2.ReshardRequest(shards=3))
        assert (up.from_shards, up.to_shards, up.to_placement) == (2, 3, PLACEMENT_VERSION) and up.records_moved > 50
        down = await c.resharder.reshard(retrieval_pb2.ReshardRequest(shards=2))
        stop.set()
        await task
        assert checks > 20 and down.records_moved > 50
        assert c.visible() == c.truth
        assert len(c.shards) == 2 and c.fleet.stopped == [2] and [p.shards for p in c.fleet.layouts] == [3, 2]
        for shard in c.shards:  # every record only on its owner
            assert all(Placement(2).shard_of(i) == shard.shard_id for i in shard.live())
        assert not (tmp_path / MARKER).exists()

    asyncio.run(main())


def test_a_reshard_that_fails_before_its_switch_rolls_back_and_is_finished_later(tmp_path) -> None:
    async def main() -> None:
        c = Cluster(tmp_path)
        for i in range(200):
            await c.put(f"id-{i:04d}", "v0")

        async def broken(*_a, **_k):
            raise FailedPrecondition("layout volume gone")

        c.fleet.record_layout = broken  # type: ignore[method-assign]
        with pytest.raises(FailedPrecondition):
            await c.resharder.reshard(retrieval_pb2.ReshardRequest(shards=3))
        assert (tmp_path / MARKER).exists() and c.routing.current == Placement(2)
        assert c.visible() == c.truth  # the copies on shard 2 are not counted
        await c.put("id-0001", "after")  # goes to the old owner only
        assert c.visible() == c.truth
        # the next start (or Reshard) removes what the stopped one left; shard 2 is retired
        assert await c.resharder.recover() == 0 and c.fleet.stopped == [2]
        assert not (tmp_path / MARKER).exists() and c.routing.phase == "idle" and c.visible() == c.truth

    asyncio.run(main())


def test_a_reshard_that_fails_after_its_switch_rolls_forward(tmp_path) -> None:
    async def main() -> None:
        c = Cluster(tmp_path, n=3)
        for i in range(200):
            await c.put(f"id-{i:04d}", "v0")
        real_delete = VersionedShard.delete

        async def refuse(self, req, timeout_s):
            raise FailedPrecondition("disk full")

        VersionedShard.delete = refuse  # type: ignore[method-assign]
        try:
            with pytest.raises(FailedPrecondition, match="disk full"):
                await c.resharder.reshard(retrieval_pb2.ReshardRequest(shards=2))  # the cleaning fails
        finally:
            VersionedShard.delete = real_delete  # type: ignore[method-assign]
        assert c.fleet.layouts == [Placement(2)] and c.routing.read == Placement(2) and (tmp_path / MARKER).exists()
        assert c.visible() == c.truth  # the new owners answer; shard 2's copies are not counted
        await c.put("id-0002", "after")
        assert c.visible() == c.truth
        assert await c.resharder.recover() == 0  # no copy on shards 0 and 1 to remove (a shrink copies onto owners); shard 2 retired
        assert c.routing.current == Placement(2) and c.routing.phase == "idle" and len(c.shards) == 2 and c.fleet.stopped == [2]
        assert c.visible() == c.truth and not (tmp_path / MARKER).exists()

    asyncio.run(main())


def test_a_caller_that_goes_away_does_not_stop_the_reshard(tmp_path) -> None:
    async def main() -> None:
        c = Cluster(tmp_path)
        for i in range(200):
            await c.put(f"id-{i:04d}", "v0")
        call = asyncio.ensure_future(c.resharder.reshard(retrieval_pb2.ReshardRequest(shards=3)))
        while c.routing.phase != "copying":
            await asyncio.sleep(0.001)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        with pytest.raises(FailedPrecondition, match="already running"):
            await c.resharder.reshard(retrieval_pb2.ReshardRequest(shards=2))
        for _ in range(2000):
            if c.routing.current == Placement(3) and c.routing.phase == "idle" and not c.lock.locked():
                break
            await asyncio.sleep(0.005)
        assert c.routing.current == Placement(3) and c.visible() == c.truth and not (tmp_path / MARKER).exists()

    asyncio.run(main())


def test_reshard_refuses_bad_counts_and_brokers_without_a_fleet(tmp_path) -> None:
    async def main() -> None:
        c = Cluster(tmp_path)
        with pytest.raises(InvalidArgument, match="shards"):
            await c.resharder.reshard(retrieval_pb2.ReshardRequest(shards=0))
        same = await c.resharder.reshard(retrieval_pb2.ReshardRequest(shards=2))
        assert same.records_moved == 0 and same.from_shards == same.to_shards == 2
        c.resharder.fleet = None
        with pytest.raises(FailedPrecondition, match="cannot reshard"):
            await c.resharder.reshard(retrieval_pb2.ReshardRequest(shards=3))

    asyncio.run(main())


def test_legacy_collection_migrates_at_the_same_count(tmp_path) -> None:
    async def main() -> None:
        c = Cluster(tmp_path)
        c.routing = c.resharder.routing = Routing(Placement(2, LEGACY_PLACEMENT))
        for i in range(200):
            await c.put(f"id-{i:04d}", "v0")
        r = await c.resharder.reshard(retrieval_pb2.ReshardRequest(shards=2))
        assert r.from_placement == LEGACY_PLACEMENT and r.to_placement == PLACEMENT_VERSION and 50 < r.records_moved < 150
        assert c.visible() == c.truth and c.routing.current == Placement(2)

    asyncio.run(main())


def test_read_layout_reads_what_write_records(tmp_path) -> None:
    check_layout(tmp_path, Layout(shards=4))
    assert read_layout(tmp_path) == Layout(shards=4, placement=PLACEMENT_VERSION)


def test_model_operations_wait_for_a_running_reshard() -> None:
    from services.broker.admin import Admin
    from services.broker.config import BrokerConfig
    from services.broker.deadlines import Deadline
    from services.broker.metrics import BrokerMetrics
    from services.broker.reads import Reader

    routing = Routing(Placement(2))
    admin = Admin(None, [], CollectionModel(""), BrokerMetrics.create(), BrokerConfig(), Reader([], BrokerConfig(), routing), routing)  # type: ignore[arg-type]
    routing.resharding = True
    with pytest.raises(FailedPrecondition, match="reshard is running; run FitWhitening"):
        asyncio.run(admin.fit_whitening(retrieval_pb2.FitWhiteningRequest(), Deadline(10.0, 10.0)))
    with pytest.raises(FailedPrecondition, match="run BuildGraph"):
        asyncio.run(admin.build_graph(retrieval_pb2.BuildGraphRequest(), Deadline(10.0, 10.0)))
