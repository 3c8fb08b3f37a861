"""Broker fan-out/merge/deadline logic against fake shards (no network, no Ray).

Shard clients raise loupe's domain errors (``services.broker.backend_errors``), so the fakes do too."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from loupe.tensors import to_tensor
from loupe.v1 import retrieval_pb2, shard_pb2
from services.broker.admission import Slots
from services.broker.metrics import BrokerMetrics
from services.broker.servicer import BrokerConfig, RetrievalServicer
from services.common.errors import Unavailable


class FakeShard:
    """Serves a fixed ranked list; can be slow or broken."""

    def __init__(self, shard_id: int, items: list[tuple[str, float]], delay_s: float = 0.0, error: type[Exception] | None = None):
        self.shard_id, self.address = shard_id, f"fake:{shard_id}"
        self.items, self.delay_s, self.error = items, delay_s, error
        self.calls = 0

    async def search(self, request: shard_pb2.ShardSearchRequest, timeout_s: float) -> shard_pb2.ShardSearchResponse:
        self.calls += 1
        if self.delay_s:
            await asyncio.wait_for(asyncio.sleep(self.delay_s), timeout_s)
        if self.error is not None:
            raise self.error("boom")
        top = self.items[: request.top_k]
        return shard_pb2.ShardSearchResponse(ids=[i for i, _ in top], scores=[s for _, s in top])

    async def close(self) -> None:
        pass


class FakeContext:
    def __init__(self, timeout_s: float | None = None):
        self._timeout = timeout_s

    def time_remaining(self):
        return self._timeout

    async def abort(self, code, details):
        raise AbortCalled(code, details)


class AbortCalled(Exception):
    def __init__(self, code, details):
        super().__init__(details)
        self.code, self.details = code, details


class NoExtractors:
    addresses: list[str] = []
    concurrency = 1
    slots = Slots(1)

    async def close(self) -> None:
        pass


def make(shards, **cfg) -> RetrievalServicer:
    return RetrievalServicer(NoExtractors(), shards, BrokerMetrics.create(), BrokerConfig(**cfg))


def vector_request(k: int, offset: int = 0) -> retrieval_pb2.SearchRequest:
    return retrieval_pb2.SearchRequest(vector=to_tensor(np.ones(4, np.float32)), k=k, offset=offset)


def run(coro):
    return asyncio.run(coro)


def test_merge_across_shards_with_offset_and_dedupe():
    a = FakeShard(0, [("a1", 0.9), ("dup", 0.8), ("a2", 0.2)])
    b = FakeShard(1, [("b1", 0.85), ("dup", 0.7), ("b2", 0.1)])
    svc = make([a, b])
    resp = run(svc.Search(vector_request(k=3, offset=1), FakeContext(5)))
    assert [r.id for r in resp.results] == ["b1", "dup", "a2"]
    assert not resp.partial


def test_slow_shard_gives_partial_answer_within_the_deadline():
    fast = FakeShard(0, [("f", 0.5)])
    slow = FakeShard(1, [("s", 0.9)], delay_s=5.0)
    svc = make([fast, slow])

    async def go():
        t0 = asyncio.get_running_loop().time()
        resp = await svc.Search(vector_request(k=2), FakeContext(0.3))
        return resp, asyncio.get_running_loop().time() - t0

    resp, elapsed = run(go())
    assert resp.partial and list(resp.missing_shards) == [1]
    assert [r.id for r in resp.results] == ["f"]
    assert elapsed < 1.0


def test_all_shards_failing_is_unavailable_and_counted():
    svc = make([FakeShard(0, [], error=Unavailable), FakeShard(1, [], error=Unavailable)])
    with pytest.raises(AbortCalled) as err:
        run(svc.Search(vector_request(k=2), FakeContext(5)))
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    value = svc.metrics.registry.get_sample_value("loupe_shard_failures_total", {"shard": "1", "reason": "UNAVAILABLE"})
    assert value == 1.0
    assert svc.metrics.registry.get_sample_value("loupe_requests_total", {"grpc_method": "Search", "grpc_code": "UNAVAILABLE"}) == 1.0


def test_validation_happens_before_any_fanout():
    shard = FakeShard(0, [("a", 1.0)])
    svc = make([shard])
    for req, field in [(vector_request(k=0), "k:"), (vector_request(k=5, offset=-2), "offset"), (retrieval_pb2.SearchRequest(k=3), "query")]:
        with pytest.raises(AbortCalled) as err:
            run(svc.Search(req, FakeContext(5)))
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details
    assert shard.calls == 0


def test_no_tasks_leak_after_partial_answers():
    svc = make([FakeShard(0, [("f", 0.5)]), FakeShard(1, [("s", 0.9)], delay_s=5.0)])

    async def go():
        await svc.Search(vector_request(k=1), FakeContext(0.2))
        await asyncio.sleep(0)
        return [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

    assert run(go()) == []


def test_shard_ids_must_be_dense():
    with pytest.raises(ValueError, match="shards"):
        make([FakeShard(1, [])])
