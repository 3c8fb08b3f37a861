"""``ReplicatedShard``'s rules (quorum writes, reads only from in-sync replicas, hedging, the
first comparison) against fake replicas: pure logic, no network."""

from __future__ import annotations

import asyncio

import pytest

from loupe.v1 import shard_pb2
from services.broker.config import BrokerConfig, quorum_size
from services.broker.replicas import ReplicatedShard
from services.common.errors import InvalidArgument, Unavailable


class FakeReplica:
    """Answers Add/Search/Stats after ``delay_s``, or fails with ``error``."""

    def __init__(self, name: str, delay_s: float = 0.0, error: type[Exception] | None = None, digest: int = 7, max_version: int = 1):
        self.address, self.delay_s, self.error = name, delay_s, error
        self.digest, self.max_version = digest, max_version
        self.calls: list[str] = []

    async def _answer(self, what: str, timeout_s: float) -> None:
        self.calls.append(what)
        if self.delay_s:
            await asyncio.wait_for(asyncio.sleep(self.delay_s), timeout_s)
        if self.error is not None:
            raise self.error(f"replica {self.address}: boom")  # the domain errors the shard clients raise

    async def add(self, request: shard_pb2.ShardAddRequest, timeout_s: float) -> shard_pb2.ShardAddResponse:
        await self._answer("add", timeout_s)
        return shard_pb2.ShardAddResponse(stored=len(request.records), total=1)

    async def search(self, request: shard_pb2.ShardSearchRequest, timeout_s: float) -> shard_pb2.ShardSearchResponse:
        await self._answer("search", timeout_s)
        return shard_pb2.ShardSearchResponse(ids=[self.address])

    async def stats(self, timeout_s: float) -> shard_pb2.ShardStatsResponse:
        await self._answer("stats", timeout_s)
        return shard_pb2.ShardStatsResponse(images=1, digest=self.digest, max_version=self.max_version, store_id=f"store-{self.address}")

    async def refresh(self) -> bool:
        return False

    async def close(self) -> None:
        pass


ADD = shard_pb2.ShardAddRequest(shard_id=0, records=[shard_pb2.ShardRecord(id="x")])


def run(coro):
    return asyncio.run(coro)


async def compared(*replicas: FakeReplica, quorum: str = "majority", hedge_after_s: float = 0.1) -> ReplicatedShard:
    """A shard over healthy replicas after its first health round (all in sync: equal digests)."""
    shard = ReplicatedShard(0, list(replicas), quorum, hedge_after_s=hedge_after_s)
    await shard.check(1.0)
    assert all(st.readable for st in shard.states)
    return shard


def test_quorum_sizes():
    assert [quorum_size("majority", n) for n in (1, 2, 3, 4, 5)] == [1, 2, 2, 3, 3]
    assert quorum_size("all", 3) == 3 and quorum_size("1", 3) == 1
    with pytest.raises(ValueError, match="write_quorum"):
        quorum_size("4", 3)
    # the configuration checks the form before the replication factor is known
    assert BrokerConfig(write_quorum="3").write_quorum == "3"
    for bad in ("most", "0", "-1", ""):
        with pytest.raises(ValueError, match="write_quorum"):
            BrokerConfig(write_quorum=bad)


def test_a_write_below_the_quorum_is_refused_as_not_stored():
    async def scenario():
        b = FakeReplica("b")
        shard = await compared(FakeReplica("a"), b)
        b.error = Unavailable
        with pytest.raises(Unavailable, match=r"reached 1 of 2 replicas, the write quorum is 2: not stored"):
            await shard.add(ADD, 1.0)
        return shard

    shard = run(scenario())
    assert [s.in_sync for s in shard.states] == [True, True]  # nothing was acknowledged: nobody lacks an acknowledged write


def test_an_acknowledged_write_a_replica_failed_takes_it_out_of_reads():
    async def scenario():
        b = FakeReplica("b")
        shard = await compared(FakeReplica("a"), b, quorum="1")
        b.error = Unavailable
        resp = await shard.add(ADD, 1.0)
        b.error = None
        answers = {(await shard.search(shard_pb2.ShardSearchRequest(), 1.0)).ids[0] for _ in range(6)}
        return resp, shard, answers

    resp, shard, answers = run(scenario())
    assert resp.replicas == 1
    assert [s.state for s in shard.states] == ["in_sync", "out_of_sync"] and shard.states[1].missed == 1
    assert answers == {"a"}  # the replica that missed the write is not read


def test_a_replica_still_storing_an_acknowledged_write_is_not_read_until_it_confirms():
    async def scenario():
        slow = FakeReplica("slow")
        shard = await compared(FakeReplica("a"), slow, quorum="1")
        slow.delay_s = 0.3
        resp = await shard.add(ADD, 2.0)
        during = [s.readable for s in shard.states]
        answers = {(await shard.search(shard_pb2.ShardSearchRequest(), 1.0)).ids[0] for _ in range(4)}
        await asyncio.sleep(0.4)
        return resp, during, answers, [s.readable for s in shard.states]

    resp, during, answers, after = run(scenario())
    assert resp.replicas == 1 and during == [True, False] and answers == {"a"} and after == [True, True]


def test_the_replicas_own_verdict_on_a_request_is_passed_on():
    async def scenario():
        shard = ReplicatedShard(0, [FakeReplica("a", error=InvalidArgument),
                                    FakeReplica("b", error=InvalidArgument)], "majority")
        await shard.add(ADD, 1.0)

    with pytest.raises(InvalidArgument, match="boom"):
        run(scenario())


def test_a_hung_replica_costs_a_hedge_delay_not_the_deadline():
    async def scenario():
        hung = FakeReplica("hung")
        shard = await compared(hung, FakeReplica("b"), quorum="1", hedge_after_s=0.05)
        hung.delay_s = 60
        loop = asyncio.get_running_loop()
        took = []
        for _ in range(4):
            t0 = loop.time()
            assert (await shard.search(shard_pb2.ShardSearchRequest(), 2.0)).ids[0] == "b"
            took.append(loop.time() - t0)
        return took, hung.calls.count("search")

    took, tried_hung = run(scenario())
    assert max(took) < 1.0
    assert tried_hung == 1  # outrun once by the hedge, then tried last (until a health check clears it)


def test_the_first_comparison_keeps_the_replica_most_ahead_and_catches_up_the_other():
    async def scenario():
        shard = ReplicatedShard(0, [FakeReplica("old", digest=1, max_version=5), FakeReplica("new", digest=2, max_version=9)], "majority")
        before = [s.readable for s in shard.states]
        shard._start_catch_ups = lambda: None  # the merge itself is tested on real shards (test_catch_up.py)
        await shard.check(1.0)
        return before, [s.state for s in shard.states]

    before, after = run(scenario())
    assert before == [False, False]  # not read before they were compared
    assert after == ["out_of_sync", "in_sync"]


def test_one_copy_is_always_read():
    async def scenario():
        shard = ReplicatedShard(0, [FakeReplica("only", error=Unavailable)], "majority")
        with pytest.raises(Unavailable, match="replica only: boom"):
            await shard.add(ADD, 1.0)  # nowhere stored: the failure as it is
        shard.replicas[0].error = None
        return (await shard.search(shard_pb2.ShardSearchRequest(), 1.0)).ids, shard.states[0].state

    assert run(scenario()) == (["only"], "in_sync")
