"""Building the collection's kNN graphs (global and regional) from the shards' pages.

Up to :data:`~services.rerank.graph.EXACT_LIMIT` nodes a graph is exact, over vectors gathered
in the broker (``ListVectors`` pages of ``page`` images, never the collection in one message).
Beyond, it is approximate and streamed (:class:`~services.rerank.graph.StreamingGraphBuilder`):
trained on a sample the shards draw, the collection paged twice — compressed into IVF-PQ codes,
then searched page by page — so the broker holds codes, the graph and one page, not the vectors.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Sequence

import numpy as np

from loupe.tensors import from_tensor
from loupe.v1 import shard_pb2
from services.broker.backends import ShardClient
from services.broker.regional_copy import RegionalCopyWriter
from services.common.errors import FailedPrecondition
from services.rerank.graph import EXACT_LIMIT, CollectionGraph, StreamingGraphBuilder

PageHandler = Callable[[list[str], np.ndarray, list[str], np.ndarray, list[int]], Awaitable[None]]


@dataclass
class _InMemory:
    """Nodes gathered for an exact build."""

    ids: list[str] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)

    def add(self, ids: list[str], vectors: np.ndarray) -> None:
        if ids:
            self.ids.extend(ids)
            self.vectors.append(vectors)

    def build(self, k: int) -> CollectionGraph | None:
        if len(self.ids) < 2:
            return None
        last = {image_id: i for i, image_id in enumerate(self.ids)}  # replaced while paging: keep the newest
        keep = np.array(sorted(last.values()), dtype=np.int64)
        vectors = np.concatenate(self.vectors)[keep]
        return CollectionGraph.build([self.ids[i] for i in keep], vectors, k)


def one_dimension(dims: dict[int, int], what: str) -> int:
    """The dimension every shard holding vectors agrees on (``dims``: shard id -> dimension, 0 =
    empty), or 0 when all are empty. Shards that disagree (records written past the broker by an
    internal-token holder, or a model change without re-indexing) make a collection-wide build
    meaningless: FAILED_PRECONDITION naming each shard's dimension."""
    held = {sid: d for sid, d in dims.items() if d}
    if len(set(held.values())) > 1:
        listed = ", ".join(f"shard {sid}: {d}" for sid, d in sorted(held.items()))
        raise FailedPrecondition(
            f"collection: shards hold {what} vectors of different dimensions ({listed}); "
            "delete the records of the wrong dimension or restore a backup, then retry"
        )
    return next(iter(held.values()), 0)


async def page_all(
    shards: Sequence[ShardClient], page: int, regional: bool, timeout: Callable[[], float], on_page: PageHandler,
) -> None:
    """Await ``on_page(ids (n,), vectors (n, D'), region_ids (m,), regional (m, D'), regional
    counts (n,))`` for every page of every shard, in the indexed space (shards page concurrently)."""
    from services.broker.collection_model import region_node

    async def one(shard: ShardClient) -> None:
        cursor = 0
        while True:
            resp = await shard.list_vectors(
                shard_pb2.ListVectorsRequest(shard_id=shard.shard_id, cursor=cursor, limit=page, include_regional=regional),
                timeout(),
            )
            vecs = from_tensor(resp.vectors, field="vectors") if resp.ids else np.zeros((0, 0), np.float32)
            reg_ids: list[str] = []
            reg = np.zeros((0, 0), np.float32)
            if regional and sum(resp.regional_counts):
                reg = from_tensor(resp.regional, field="regional")
                reg_ids = [region_node(i, j) for i, c in zip(resp.ids, resp.regional_counts) for j in range(c)]
            await on_page(list(resp.ids), vecs, reg_ids, reg, list(resp.regional_counts) if regional else [])
            if resp.done:
                return
            cursor = resp.next_cursor

    await asyncio.gather(*(one(s) for s in shards))


SAMPLE_PAGE_BYTES = 32 << 20
"""Largest SampleVectors answer asked for (half the default message limit)."""


async def sample_all(
    shards: Sequence[ShardClient], n: int, regional: bool, timeout: Callable[[], float],
) -> tuple[np.ndarray, np.ndarray]:
    """About ``n`` raw global vectors ``(n, D)`` (and regional ones) drawn from the shards in
    answers of at most :data:`SAMPLE_PAGE_BYTES` (calls with different seeds)."""
    per_shard = math.ceil(n / max(len(shards), 1))

    async def one(shard: ShardClient) -> tuple[list[np.ndarray], list[np.ndarray]]:
        g: list[np.ndarray] = []
        r: list[np.ndarray] = []
        got, seed, per_call = 0, 0, 256
        while got < per_shard:
            asked = min(per_call, per_shard - got)
            resp = await shard.sample_vectors(shard_pb2.SampleVectorsRequest(
                shard_id=shard.shard_id, max_vectors=asked, seed=seed, include_regional=regional), timeout())
            x = from_tensor(resp.vectors, field="vectors")
            if len(x):
                g.append(x)
                if regional and resp.regional.shape:
                    r.append(from_tensor(resp.regional, field="regional"))
                per_call = max(1, SAMPLE_PAGE_BYTES // (4 * x.shape[1] * (2 if regional else 1)))
            got, seed = got + len(x), seed + 1
            if len(x) < asked:
                break  # the shard holds fewer than asked: it gave them all
        return g, r

    parts = await asyncio.gather(*(one(s) for s in shards))
    g = [x for p in parts for x in p[0] if len(x)]
    r = [x for p in parts for x in p[1] if len(x)]
    return (np.concatenate(g) if g else np.zeros((0, 0), np.float32)), (np.concatenate(r) if r else np.zeros((0, 0), np.float32))


async def build_graphs(
    shards: Sequence[ShardClient],
    transform: Callable[[np.ndarray], np.ndarray],
    *,
    k: int,
    regional_k: int,
    page: int,
    timeout: Callable[[], float],
    run: Callable[..., Awaitable],
    train_sample: int = 100_000,
    copy: RegionalCopyWriter | None = None,
) -> tuple[CollectionGraph | None, CollectionGraph | None, dict[str, str]]:
    """The collection's global and regional kNN graphs (None where fewer than 2 nodes).

    ``transform`` maps raw sampled vectors to the indexed space; ``run(fn, *args)`` runs CPU
    work off the event loop; ``copy`` (optional) receives every page's regional vectors as they
    pass (the broker's regional copy, ``services.broker.regional_copy``). Returns the graphs and
    how each was built ("exact" or the IVF-PQ factory string).
    """
    stats = await asyncio.gather(*(s.stats(timeout()) for s in shards))
    one_dimension({s.shard_id: s.dim if s.images else 0 for s in stats}, "indexed")
    images = sum(s.images for s in stats)
    regions = sum(s.regional_vectors for s in stats)
    streamed = {"global": images > EXACT_LIMIT, "regional": regions > EXACT_LIMIT}
    builders: dict[str, StreamingGraphBuilder | _InMemory] = {}
    if any(streamed.values()):
        samples = await sample_all(shards, train_sample, streamed["regional"], timeout)
        for kind, expected, kk in (("global", images, k), ("regional", regions, regional_k)):
            if streamed[kind]:
                sample = transform(samples[0] if kind == "global" else samples[1])
                builders[kind] = await run(StreamingGraphBuilder, sample, expected, kk)
    builders.setdefault("global", _InMemory())
    builders.setdefault("regional", _InMemory())

    lock = asyncio.Lock()  # pages of several shards arrive together; builders take one at a time

    def collect(ids: list[str], vecs: np.ndarray, reg_ids: list[str], reg: np.ndarray, counts: list[int]) -> None:
        builders["global"].add(ids, vecs)
        builders["regional"].add(reg_ids, reg)
        if copy is not None and counts:
            copy.add(ids, counts, reg)

    def search(ids: list[str], vecs: np.ndarray, reg_ids: list[str], reg: np.ndarray, counts: list[int]) -> None:
        if streamed["global"] and ids:
            builders["global"].search(ids, vecs)
        if streamed["regional"] and reg_ids:
            builders["regional"].search(reg_ids, reg)

    def serialised(fn: Callable[..., None]) -> PageHandler:
        async def handle(*args: object) -> None:
            async with lock:
                await run(fn, *args)
        return handle

    await page_all(shards, page, regions > 0, timeout, serialised(collect))
    if any(streamed.values()):
        await page_all(shards, page, streamed["regional"], timeout, serialised(search))
    out: list[CollectionGraph | None] = []
    how: dict[str, str] = {}
    for kind, kk in (("global", k), ("regional", regional_k)):
        b = builders[kind]
        if isinstance(b, StreamingGraphBuilder):
            out.append(await run(b.finish))
            how[kind] = b.factory
        else:
            out.append(await run(b.build, kk))
            how[kind] = "exact"
    return out[0], out[1], how
