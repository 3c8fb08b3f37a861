"""The approximate, streamed kNN graph: close to the exact one, robust to ids replaced while
paging, and built by the broker from shard pages (fake shard clients serving real arrays)."""

from __future__ import annotations

import asyncio

import numpy as np

from loupe.tensors import to_tensor
from loupe.v1 import shard_pb2
from services.broker import graph_build
from services.rerank.graph import CollectionGraph, StreamingGraphBuilder


def clustered(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((50, d)).astype(np.float32)
    x = centers[rng.integers(0, 50, n)] + 0.4 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def neighbour_recall(approx: CollectionGraph, exact: CollectionGraph) -> float:
    """Mean share of each node's exact neighbours (by id) that the approximate graph lists."""
    rows = exact.rows_of(approx.ids)
    hits = [
        len({approx.ids[j] for j in approx.neighbours[i] if j >= 0} & {exact.ids[j] for j in exact.neighbours[rows[i]]})
        for i in range(len(approx.ids))
    ]
    return float(np.mean(hits)) / exact.k


def test_streamed_graph_is_close_to_the_exact_one_and_keeps_newest_rows():
    x = clustered(4000)
    ids = [f"i{j}" for j in range(len(x))]
    b = StreamingGraphBuilder(x[:2000], expected=len(x), k=10)
    for s in range(0, len(x), 700):
        b.add(ids[s : s + 700], x[s : s + 700])
    b.add(["i5"], x[6:7])  # i5 replaced while paging: its newest vector (a copy of i6) wins
    for s in range(0, len(x), 700):
        b.search(ids[s : s + 700], np.where(np.arange(s, min(s + 700, len(x)))[:, None] == 5, x[6], x[s : s + 700]))
    b.search(["new-id"], x[:1])  # not in the first pass: skipped
    g = b.finish()
    assert len(g) == len(x) and g.ids.count("i5") == 1 and "new-id" not in g.ids
    assert g.neighbours.max() < len(x) and (g.neighbours != np.arange(len(x))[:, None]).all()
    x2 = x.copy()
    x2[5] = x[6]
    exact = CollectionGraph.build(ids, x2, k=10)
    assert neighbour_recall(g, exact) >= 0.8
    assert "i6" in [g.ids[j] for j in g.neighbours[g.ids.index("i5")][:2]]


class FakeShard:
    """Serves ListVectors/SampleVectors/Stats from arrays (the broker's paging logic under test)."""

    def __init__(self, shard_id: int, ids: list[str], x: np.ndarray, regions: np.ndarray) -> None:
        self.shard_id, self.ids, self.x, self.regions = shard_id, ids, x, regions

    async def stats(self, timeout_s: float) -> shard_pb2.ShardStatsResponse:
        return shard_pb2.ShardStatsResponse(images=len(self.ids), regional_vectors=len(self.regions))

    async def sample_vectors(self, req: shard_pb2.SampleVectorsRequest, timeout_s: float) -> shard_pb2.SampleVectorsResponse:
        n = min(req.max_vectors, len(self.x))
        return shard_pb2.SampleVectorsResponse(vectors=to_tensor(self.x[:n]), regional=to_tensor(self.regions[:n]))

    async def list_vectors(self, req: shard_pb2.ListVectorsRequest, timeout_s: float) -> shard_pb2.ListVectorsResponse:
        await asyncio.sleep(0)
        s, e = req.cursor, min(req.cursor + req.limit, len(self.ids))
        resp = shard_pb2.ListVectorsResponse(ids=self.ids[s:e], vectors=to_tensor(self.x[s:e]), next_cursor=e, done=e == len(self.ids))
        if req.include_regional:
            resp.regional.CopyFrom(to_tensor(self.regions[s:e]))
            resp.regional_counts.extend([1] * (e - s))
        return resp


def test_broker_streams_large_collections_and_builds_small_ones_exactly(monkeypatch):
    x = clustered(3000, seed=1)
    shards = [FakeShard(i, [f"s{i}-{j}" for j in range(1500)], x[i * 1500 : (i + 1) * 1500], x[i * 1500 : (i + 1) * 1500]) for i in range(2)]

    async def run(fn, *args):
        return fn(*args)

    def build(limit: int):
        monkeypatch.setattr(graph_build, "EXACT_LIMIT", limit)
        return asyncio.run(graph_build.build_graphs(
            shards, lambda v: v, k=8, regional_k=8, page=400, timeout=lambda: 10.0, run=run,
        ))

    g, r, how = build(limit=1000)
    assert how["global"].startswith("IVF") and how["regional"].startswith("IVF")
    assert len(g) == 3000 and len(r) == 3000 and r.ids[0].endswith("#0")
    exact, _, how_exact = build(limit=10_000)
    assert how_exact == {"global": "exact", "regional": "exact"}
    assert neighbour_recall(g, exact) >= 0.8
