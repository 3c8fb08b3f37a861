"""Collection administration: statistics, the collection whitening, the offline kNN graphs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Sequence

import numpy as np

from loupe.tensors import from_tensor
from loupe.v1 import retrieval_pb2, shard_pb2
from services.broker.backends import ExtractorPool
from services.broker.collection_model import CollectionModel
from services.broker.config import BrokerConfig
from services.broker.deadlines import Deadline
from services.broker.graph_build import build_graphs, one_dimension
from services.broker.metrics import BrokerMetrics
from services.broker.reads import Reader
from services.broker.replicas import ReplicatedShard
from services.broker.routing import Routing
from services.common import limits
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from services.space.whitening import PCAWhitening

log = logging.getLogger(__name__)


def check_pairs(pairs: Sequence[retrieval_pb2.ImagePair]) -> None:
    """InvalidArgument naming the field: too many pairs, a malformed id, a pair of one image."""
    if len(pairs) > limits.MAX_WHITENING_PAIRS:
        raise InvalidArgument(f"pairs: at most {limits.MAX_WHITENING_PAIRS} pairs, got {len(pairs)}")
    for i, p in enumerate(pairs):
        limits.check_id(p.a, f"pairs[{i}].a")
        limits.check_id(p.b, f"pairs[{i}].b")
        if p.a == p.b:
            raise InvalidArgument(f"pairs[{i}]: a pair needs two different images, got {p.a!r} twice")


class Admin:
    """GetStats, FitWhitening and BuildGraph over every shard."""

    def __init__(self, extractors: ExtractorPool, shards: Sequence[ReplicatedShard], collection: CollectionModel,
                 metrics: BrokerMetrics, config: BrokerConfig, reader: Reader, routing: Routing | None = None) -> None:
        self.routing = routing  # None: no reshard can run
        self.reader = reader
        self.extractors = extractors
        self.shards = shards
        self.collection = collection
        self.metrics = metrics
        self.config = config

    async def stats(self, deadline: Deadline) -> retrieval_pb2.GetStatsResponse:
        """Collection and per-shard statistics (a shard with no readable copy answering is listed
        unhealthy). Every copy is asked once; a shard's figures are its first readable copy's."""
        graph, regional = self.collection.graph, self.collection.regional_graph
        resp = retrieval_pb2.GetStatsResponse(
            extractors=self.extractors.addresses,
            graph_images=len(graph) if graph is not None else 0,
            graph_regions=len(regional) if regional is not None else 0,
        )
        per_replica = await asyncio.gather(
            *(asyncio.gather(*(r.stats(min(5.0, deadline.remaining())) for r in s.replicas), return_exceptions=True)
              for s in self.shards)
        )
        for shard, replica_results in zip(self.shards, per_replica):
            res = next((r for r, state in zip(replica_results, shard.states) if state.readable and not isinstance(r, BaseException)), None)
            st = resp.shards.add(shard_id=shard.shard_id, address=shard.address, healthy=res is not None)
            for j, (client, state, rres) in enumerate(zip(shard.replicas, shard.states, replica_results)):
                rep = st.replicas.add(replica=j, address=client.address, state=state.state if not isinstance(rres, BaseException) else "down",
                                      lag_writes=state.missed, catch_up_progress=state.progress)
                if not isinstance(rres, BaseException):
                    rep.images, rep.digest, rep.store_id = rres.images, rres.digest, rres.store_id
            if res is None:
                continue
            st.images, st.feature_bytes = res.images, res.feature_bytes
            st.regional_vectors, st.local_features = res.regional_vectors, res.local_features
            st.store_bytes, st.index_bytes, st.index, st.startup_seconds = res.store_bytes, res.index_bytes, res.index, res.startup_seconds
            st.oversized_records = res.oversized_records
            resp.images += res.images
            resp.dim = max(resp.dim, res.dim)
            resp.whitened = resp.whitened or res.whitened
            self.metrics.shard_vectors.labels(str(shard.shard_id)).set(res.images)
            self.metrics.shard_store_bytes.labels(str(shard.shard_id)).set(res.store_bytes)
        with contextlib.suppress(Unavailable):
            d = await self.extractors.describe(min(5.0, deadline.remaining()))
            resp.model = f"{d.backbone} {d.pooling} D={d.dim} scales={[round(s, 3) for s in d.scales]} max_side={d.max_side}"
        return resp

    def _not_resharding(self, what: str) -> None:
        """FAILED_PRECONDITION while a reshard runs: shards come and go, records sit on two of them."""
        if self.routing is not None and self.routing.resharding:
            raise FailedPrecondition(f"broker: a reshard is running; run {what} when it has finished")

    async def fit_whitening(self, request: retrieval_pb2.FitWhiteningRequest, deadline: Deadline) -> retrieval_pb2.FitWhiteningResponse:
        """Learn the whitening on a sample of every shard (PCA-whitening, or the learned whitening
        of ``request.pairs``) and install it everywhere (or remove it)."""
        self._not_resharding("FitWhitening")
        limits.check_int_range(request.max_vectors, "max_vectors", 0, limits.MAX_WHITENING_SAMPLE)
        limits.check_int_range(request.dim, "dim", 0, limits.MAX_VECTOR_DIM)
        check_pairs(request.pairs)
        payload = b""
        sample = 0
        dim = 0
        if not request.remove:
            per_shard = max(1, (request.max_vectors or self.config.whitening_sample) // len(self.shards))
            samples = await asyncio.gather(
                *(s.sample_vectors(shard_pb2.SampleVectorsRequest(shard_id=s.shard_id, max_vectors=per_shard, seed=i), deadline.remaining())
                  for i, s in enumerate(self.shards))
            )
            parts = {s.shard_id: from_tensor(r.vectors, field="vectors") for s, r in zip(self.shards, samples) if r.vectors.shape}
            one_dimension({sid: p.shape[1] if len(p) else 0 for sid, p in parts.items()}, "global")
            x = np.concatenate(list(parts.values())) if parts else np.zeros((0, 0), np.float32)
            if len(x) < 2:
                raise FailedPrecondition(f"collection: {len(x)} images indexed, whitening needs at least 2")
            if request.dim > x.shape[1]:
                raise InvalidArgument(f"dim: must be <= the indexed dimension {x.shape[1]}, got {request.dim}")
            w = PCAWhitening()
            loop = asyncio.get_running_loop()  # eigendecompositions of (D, D): seconds, off the event loop
            if request.pairs:
                a, b = await self._pair_vectors(request.pairs, x.shape[1], deadline)
                await loop.run_in_executor(None, lambda: w.fit_pairs(x, a, b, dim=request.dim or None))
            else:
                await loop.run_in_executor(None, lambda: w.fit(x, dim=request.dim or None))
            payload, sample, dim = w.to_bytes(), len(x), w.output_dim
        await asyncio.gather(
            *(s.set_whitening(shard_pb2.SetWhiteningRequest(shard_id=s.shard_id, whitening=payload), deadline.remaining()) for s in self.shards)
        )
        self.collection.set_whitening(PCAWhitening.from_bytes(payload) if payload else None)
        return retrieval_pb2.FitWhiteningResponse(sample_size=sample, dim=dim, pairs=len(request.pairs) if payload else 0)

    async def _pair_vectors(self, pairs: Sequence[retrieval_pb2.ImagePair], dim: int, deadline: Deadline) -> tuple[np.ndarray, np.ndarray]:
        """``(P, D)`` raw stored global vectors of every pair's ``a`` and of its ``b``."""
        ids = list(dict.fromkeys(i for p in pairs for i in (p.a, p.b)))
        vectors: dict[str, np.ndarray] = {}
        missing: list[str] = []
        unavailable: list[str] = []
        for start in range(0, len(ids), limits.MAX_GET_IDS):
            chunk = retrieval_pb2.GetImagesRequest(ids=ids[start : start + limits.MAX_GET_IDS], with_vector=True)
            resp = await self.reader.get(chunk, deadline)
            vectors.update((img.id, from_tensor(img.vector, field="vector")) for img in resp.images)
            missing += resp.missing
            unavailable += resp.unavailable
        if unavailable:
            raise Unavailable(f"pairs: the shards holding {len(unavailable)} of the pairs' images did not answer (e.g. {unavailable[0]!r})")
        if missing:
            raise NotFound(f"pairs: {len(missing)} of the pairs' images are not indexed (e.g. {', '.join(map(repr, missing[:3]))})")
        stray = {v.shape[0] for v in vectors.values()} - {dim}
        if stray:
            raise FailedPrecondition(f"pairs: images of dimension {sorted(stray)} in a collection of dimension {dim}")
        return np.stack([vectors[p.a] for p in pairs]), np.stack([vectors[p.b] for p in pairs])

    async def build_graph(self, request: retrieval_pb2.BuildGraphRequest, deadline: Deadline) -> retrieval_pb2.BuildGraphResponse:
        """Build (or remove) the collection's global and regional kNN graphs."""
        self._not_resharding("BuildGraph")
        if request.k < 0 or request.k > self.config.max_graph_k:
            raise InvalidArgument(f"k: must be in 0..{self.config.max_graph_k}, got {request.k}")
        if request.remove:
            self.collection.set_graph(None)
            return retrieval_pb2.BuildGraphResponse()
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        k = request.k or self.config.diffusion.k
        writer = self.collection.begin_build()
        try:
            graph, regional, how = await build_graphs(
                self.shards, self.collection.transform, k=k, regional_k=request.k or self.config.regional_diffusion.k,
                page=self.config.graph_page, timeout=deadline.remaining,
                run=lambda fn, *args: loop.run_in_executor(None, fn, *args), copy=writer,
            )
            if graph is None:
                raise FailedPrecondition("collection: fewer than 2 images indexed, a graph needs at least 2")
            copy = await loop.run_in_executor(None, writer.finish) if regional is not None else None
            if copy is None:
                writer.abort()
        except BaseException:
            writer.abort()
            self.collection.end_build()
            raise
        log.info("collection graphs built in %.1f s: global %s (%d images), regional %s", time.perf_counter() - t0,
                 how["global"], len(graph), how["regional"])
        self.collection.set_graph(graph, regional, copy)
        return retrieval_pb2.BuildGraphResponse(
            images=len(graph), k=graph.k, bytes=graph.nbytes + (regional.nbytes if regional else 0),
            seconds=time.perf_counter() - t0, regions=len(regional) if regional else 0,
        )
