"""How a search runs: query → fan-out → merge → the plan's rerank stages → result assembly.

One ``SearchPipeline`` per broker. ``search`` runs one validated request end to end; its parts
(``prepare``, ``fanout``, ``finish``) are public so that a batch of queries can share
extraction and one fan-out per shard (``services.broker.batch``). ``finish`` runs the plan's
stage objects in order (``services.broker.rerank_stages``); the pipeline is their
``RerankBackend`` (fan-outs, regional vectors, verification). Every stage is timed into
``loupe_broker_stage_seconds{stage}`` and into the response's ``timings``.

Backends raise loupe's domain errors (``services.broker.backend_errors``): no gRPC here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import Executor
from typing import Iterator, Sequence, TypeVar

import numpy as np

from loupe.tensors import from_tensor, to_tensor
from loupe.v1 import extractor_pb2, retrieval_pb2, shard_pb2, types_pb2
from services.broker.backend_errors import failure_reason
from services.broker.backends import ExtractorPool, ShardClient
from services.broker.collection_model import CollectionModel
from services.broker.config import BrokerConfig
from services.broker.deadlines import Deadline, PerCallBudget, shard_timeout
from services.broker.metrics import BrokerMetrics
from services.broker.query import Query, unit_vector
from services.broker.rerank_stages import RegionalNodes, RerankState
from services.broker.routing import ReadView, Routing
from services.broker.search_plan import SearchPlan
from services.broker.topk import Hit, ids_by_shard, merge_topk
from services.broker.verification import Outcome, VerifiedHit, confidence, query_confidence, rank_verified, verify_locally
from services.common import limits
from services.common.errors import DeadlineExceeded, InvalidArgument, NotFound, Unavailable
from services.common.local_candidates import (
    candidate_local,
    candidate_locals,
    params_to_proto,
    query_local_to_proto,
    result_from_proto,
)
from services.space.placement import Placement
from services.common.message_size import MessageBudget, features_bytes, shard_hit_bytes, verified_candidate_bytes
from services.rerank.verify import VerifyParams

__all__ = ["Query", "SearchPipeline", "hits_of", "unit_vector"]

log = logging.getLogger(__name__)
T = TypeVar("T")
VERIFY_PAIRS_PER_BUDGET = 100
"""Candidates a shard Verify call may take ``broker.shard_budget_s`` for (~0.5 s of work here)."""
_INVALID_ARGUMENT = 3  # grpc.StatusCode.INVALID_ARGUMENT's number in a ShardSearchBatchResult
Budget = Deadline | PerCallBudget


def _padded(seq: Sequence[T], n: int) -> list[T | None]:
    out: list[T | None] = list(seq)[:n]
    return out + [None] * (n - len(out))


def hits_of(resp: shard_pb2.ShardSearchResponse, shard_id: int, with_vectors: bool) -> list[Hit]:
    """A shard's answer as Hits, best first."""
    vectors = from_tensor(resp.vectors, field="vectors") if with_vectors and resp.vectors.shape else None
    return [
        Hit(score, image_id, shard_id, dict(md.values) if md is not None and md.values else None,
            vectors[i] if vectors is not None else None)
        for i, (image_id, score, md) in enumerate(zip(resp.ids, resp.scores, _padded(resp.metadata, len(resp.ids))))
    ]


def owned(view: ReadView, hits: list[Hit]) -> list[Hit]:
    """A shard's hits less the copies it holds of records another shard owns (a reshard running)."""
    if not view.filtering:
        return hits
    return [h for h in hits if view.counts(h.shard_id, h.image_id)]


class SearchPipeline:
    """Runs searches over the broker's backends.

    Parameters
    ----------
    extractors : ExtractorPool
        Where image queries are described.
    shards : sequence of ShardClient
        Every shard, index = shard id (the broker's list: a reshard adds and retires shards).
    collection : CollectionModel
        Whitening, local PCA and kNN graphs of the collection.
    metrics : BrokerMetrics
        Stage histograms, shard failures, verification counters.
    config : BrokerConfig
        Defaults and budgets.
    verify_pool : Executor
        Threads that verify candidate pairs.
    budget : MessageBudget
        The message limit shard answers must fit: batch fan-outs are split and feature reads
        batched so that each shard answer fits by construction.
    routing : Routing or None
        Which shards a fan-out asks and which shard's hit of an id counts (``services.broker.routing``;
        None = the bucket placement over ``shards``, no reshard).
    """

    def __init__(self, extractors: ExtractorPool, shards: Sequence[ShardClient], collection: CollectionModel,
                 metrics: BrokerMetrics, config: BrokerConfig, verify_pool: Executor, budget: MessageBudget = MessageBudget(),
                 routing: Routing | None = None) -> None:
        self.routing = routing or Routing(Placement(len(shards)))
        self.budget = budget
        self.extractors = extractors
        self.shards = shards
        self.collection = collection
        self.metrics = metrics
        self.config = config
        self.verify_pool = verify_pool

    @contextlib.contextmanager
    def stage(self, name: str, timings: list[types_pb2.StageTiming]) -> Iterator[None]:
        """Time a stage into the stage histogram and the response's timings."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self.metrics.stage_seconds.labels(name).observe(dt)
            timings.append(types_pb2.StageTiming(stage=name, seconds=dt))

    # --- one whole search ------------------------------------------------------------------
    async def search(self, request: retrieval_pb2.SearchRequest, plan: SearchPlan, deadline: Budget) -> retrieval_pb2.SearchResponse:
        """Run a validated request end to end."""
        timings: list[types_pb2.StageTiming] = []
        t_total = time.perf_counter()
        with self.routing.reads.running():  # a reshard retires a shard only after the searches that may ask it
            query = await self.prepare(request, plan, deadline, timings)
            with self.stage("fanout", timings):
                per_shard, missing = await self.fanout(query.vector, query.depth(request, plan), deadline, plan.need_vectors,
                                                       flt=query.filter)
            return await self.finish(request, plan, query, per_shard, missing, deadline, timings, t_total)

    # --- the query ---------------------------------------------------------------------------
    async def extract(self, request: extractor_pb2.ExtractRequest, deadline: Budget) -> extractor_pb2.ExtractResponse:
        """Describe one image on an extractor replica."""
        return await self.extractors.extract(request, deadline.remaining(), query=True)

    async def prepare(self, request: retrieval_pb2.SearchRequest, plan: SearchPlan, deadline: Budget,
                      timings: list[types_pb2.StageTiming]) -> Query:
        """The request's query: extracted from its image, read from a stored image, or its raw vector."""
        flt = request.filter if request.filter.all else None
        which = request.WhichOneof("query")
        if which == "id":
            with self.stage("lookup", timings):
                query = await self.stored_query(request.id, plan, deadline)
            return Query(query.vector, query.local, query.regions, None if request.include_query else request.id, flt)
        if which == "image":
            with self.stage("extract", timings):
                ext = await self.extract(
                    extractor_pb2.ExtractRequest(
                        image=request.image,
                        crop=request.crop if request.HasField("crop") else None,
                        want_local=plan.verify is not None,
                        want_regional=plan.regional,
                        query=True,
                    ),
                    deadline,
                )
            query = self.query_of_features(ext.features, plan)
            return Query(query.vector, query.local, query.regions, None, flt)
        if plan.verify is not None:
            raise InvalidArgument("rerank.verify: needs an image query (a vector has no local features)")
        if plan.regional:
            raise InvalidArgument("rerank.diffuse.regional: needs an image query (a vector has no regions)")
        return Query(unit_vector(from_tensor(request.vector, field="vector")), filter=flt)

    async def stored_query(self, image_id: str, plan: SearchPlan, deadline: Budget) -> Query:
        """The query of a search by stored id: the image's stored raw global vector, its indexed
        regional vectors and its (collection-PCA) local features, read from its shard. A shard
        that does not answer within its budget (``shard_timeout``) is UNAVAILABLE while the
        caller's own deadline still runs: no other shard holds the image."""
        sid = self.routing.view().owner(image_id)
        req = shard_pb2.GetFeaturesRequest(shard_id=sid, ids=[image_id], want_global=True, want_raw_global=True,
                                           want_regional=plan.regional, want_local=plan.verify is not None)
        budget = shard_timeout(deadline, self.config)
        try:
            resp = await self.shards[sid].get_features(req, budget)
        except DeadlineExceeded:  # the shard's budget ran out, not (yet) the caller's: the shard is unavailable
            deadline.check()
            raise Unavailable(f"id: shard {sid}, which holds {image_id!r}, did not answer within {budget:.1f} s") from None
        if not resp.ids:
            raise NotFound(f"id: no image {image_id!r} is indexed")
        feats = resp.features[0]
        vector = from_tensor(feats.__getattribute__("global"), field="features.global").astype(np.float32)
        local = None
        if plan.verify is not None:
            c = candidate_local(feats)
            local = (c.keypoints.astype(np.float32), c.descriptors.astype(np.float32)) if c is not None else None
        regions = from_tensor(feats.regional, field="regional").astype(np.float32) if plan.regional and feats.regional.shape else None
        return Query(vector, local, regions)

    def query_of_features(self, feats: types_pb2.ImageFeatures, plan: SearchPlan) -> Query:
        """A query from freshly extracted features (raw local descriptors are PCA-projected here)."""
        vector = from_tensor(feats.__getattribute__("global"), field="features.global")
        local = regions = None
        if plan.verify is not None and feats.local.keypoints.shape and self.collection.local_pca is not None:
            local = (
                from_tensor(feats.local.keypoints, field="keypoints"),
                self.collection.project(from_tensor(feats.local.descriptors, field="descriptors")),
            )
        if plan.regional and feats.regional.shape:
            regions = self.collection.transform(from_tensor(feats.regional, field="regional"))
        return Query(vector, local, regions)

    # --- fan-out -----------------------------------------------------------------------------
    async def fanout(
        self, query: np.ndarray, depth: int, deadline: Budget, return_vectors: bool = False, transformed: bool = False,
        flt: types_pb2.Filter | None = None,
    ) -> tuple[list[list[Hit]], list[int]]:
        """Ask every shard for its top-``depth`` (among the images ``flt`` keeps); returns
        per-shard hit lists and missing shard ids."""
        tensor = to_tensor(query.astype(np.float32))

        async def one(shard: ShardClient) -> list[Hit]:
            timeout = shard_timeout(deadline, self.config)
            req = shard_pb2.ShardSearchRequest(
                shard_id=shard.shard_id, query=tensor, top_k=depth, timeout_s=timeout,
                return_vectors=return_vectors, query_transformed=transformed, filter=flt,
            )
            return owned(view, hits_of(await shard.search(req, timeout), shard.shard_id, return_vectors))

        view = self.routing.view()
        shards = view.read_shards(self.shards)
        results = await asyncio.gather(*(one(s) for s in shards), return_exceptions=True)
        return self.sort_out(shards, results, deadline)

    async def fanout_batch(
        self, items: Sequence[tuple[Query, int, bool]], deadline: Budget
    ) -> list[tuple[list[list[Hit]], list[int]] | Exception]:
        """The first-stage fan-out of many queries ((query, depth, return_vectors) each):
        SearchBatch calls per shard, the queries cut into consecutive groups whose worst-case
        answer (depth x ``shard_hit_bytes``, 4 KiB of metadata per hit) fits the message limit.
        Returns, per query, its per-shard hit lists and missing shard ids, or the error that
        query alone gets (INVALID_ARGUMENT from a shard, UNAVAILABLE when no shard answered)."""
        groups = self.budget.split(
            [depth * shard_hit_bytes(query.vector.shape[0] if return_vectors else 0) for query, depth, return_vectors in items]
        )

        async def one(shard: ShardClient, group: list[int]) -> shard_pb2.ShardSearchBatchResponse:
            timeout = shard_timeout(deadline, self.config, queries=len(group))
            req = shard_pb2.ShardSearchBatchRequest(shard_id=shard.shard_id, timeout_s=timeout)
            for query, depth, return_vectors in (items[i] for i in group):
                req.queries.add(shard_id=shard.shard_id, query=to_tensor(query.vector.astype(np.float32)), top_k=depth,
                                return_vectors=return_vectors, filter=query.filter)
            return await shard.search_batch(req, timeout)

        view = self.routing.view()
        shards = view.read_shards(self.shards)
        calls = [(pos, group) for pos in range(len(shards)) for group in groups]
        answers = await asyncio.gather(*(one(shards[pos], group) for pos, group in calls), return_exceptions=True)
        # per query, per shard: that shard's result for it, or the exception of the call that carried it
        by_query: list[list] = [[None] * len(shards) for _ in items]
        for (pos, group), res in zip(calls, answers):
            for j, i in enumerate(group):
                by_query[i][pos] = res if isinstance(res, BaseException) else res.results[j]
        out: list[tuple[list[list[Hit]], list[int]] | Exception] = []
        for i, (_, _, return_vectors) in enumerate(items):
            per_query = []
            for shard, r in zip(shards, by_query[i]):
                if isinstance(r, BaseException):
                    per_query.append(r)
                elif r.code == _INVALID_ARGUMENT:
                    per_query.append(InvalidArgument(r.message or "invalid query"))
                elif r.code:
                    per_query.append(Unavailable(f"shard {shard.shard_id}: {r.message}"))
                else:
                    per_query.append(owned(view, hits_of(r.response, shard.shard_id, return_vectors)))
            try:
                out.append(self.sort_out(shards, per_query, deadline, count_failures=i in (g[0] for g in groups)))
            except Exception as exc:  # this query's own error (bad query, no shard answered)
                out.append(exc)
        return out

    def sort_out(self, shards: Sequence[ShardClient], results: Sequence[T | BaseException], deadline: Budget,
                 count_failures: bool = True) -> tuple[list[T], list[int]]:
        """Per-shard outcomes (of ``shards``, in order) → (answers, missing shard ids); a shard's INVALID_ARGUMENT is the
        caller's, every other failure makes the shard missing (UNAVAILABLE when all are).
        ``count_failures`` counts shard failures in the metrics (once per fan-out)."""
        lists, missing = [], []
        for shard, res in zip(shards, results):
            if isinstance(res, BaseException):
                if isinstance(res, InvalidArgument):
                    raise InvalidArgument(str(res) or "invalid query") from None
                reason = failure_reason(res)
                if count_failures:
                    self.metrics.shard_failures.labels(str(shard.shard_id), reason).inc()
                    log.warning("shard %d failed: %s", shard.shard_id, reason)
                missing.append(shard.shard_id)
            else:
                lists.append(res)
        if len(missing) == len(shards):
            deadline.remaining()  # a deadline that ran out is reported as such
            raise Unavailable("no shard answered the search")
        return lists, missing

    # --- rerank and assembly ----------------------------------------------------------------
    async def finish(
        self, request: retrieval_pb2.SearchRequest, plan: SearchPlan, query: Query, per_shard: list[list[Hit]], missing: list[int],
        deadline: Budget, timings: list[types_pb2.StageTiming], t_total: float,
    ) -> retrieval_pb2.SearchResponse:
        """Merge the shards' answers, run the rerank stages, assemble the response."""
        depth = query.depth(request, plan)
        with self.stage("merge", timings):
            hits = [h for h in merge_topk(per_shard, depth) if h.image_id != query.exclude]
        state = RerankState(query, hits, depth, deadline, missing=set(missing))
        for stage in plan.stages:
            if stage.applies(state):
                with self.stage(stage.name, timings):
                    await stage.run(self, state)
        hits, verified, global_scores, missing = state.hits, state.verified, state.global_scores, sorted(state.missing)
        resp = retrieval_pb2.SearchResponse(partial=bool(missing), missing_shards=missing)
        if missing:
            self.metrics.partial_responses.inc()
        if plan.verify is not None:
            resp.query_confidence = query_confidence(verified.values(), plan.verify.min_inliers)
            self.metrics.query_confidence.observe(resp.query_confidence)
        for hit in hits[request.offset : request.offset + request.k]:
            self._add_result(resp, hit, global_scores, verified.get(hit.image_id), plan, request.return_matches, query.local)
        dt = time.perf_counter() - t_total
        self.metrics.stage_seconds.labels("total").observe(dt)
        timings.append(types_pb2.StageTiming(stage="total", seconds=dt))
        resp.timings.extend(timings)
        return resp

    @staticmethod
    def _add_result(resp: retrieval_pb2.SearchResponse, hit: Hit, global_scores: dict[str, float], v: VerifiedHit | None,
                    plan: SearchPlan, return_matches: bool, query_local: tuple[np.ndarray, np.ndarray] | None) -> None:
        r = resp.results.add(id=hit.image_id, score=hit.score, shard_id=hit.shard_id)
        r.stages.__setattr__("global", global_scores.get(hit.image_id, hit.score))
        if plan.diffusion is not None:
            r.stages.diffusion = hit.score if v is None or not v.verified else 0.0
        if hit.payload:
            r.metadata.update(hit.payload)
        if v is None or v.result is None:
            return
        r.score = v.score
        r.stages.inliers = v.result.inliers
        r.verified = v.verified
        r.confidence = confidence(v.result, plan.verify.min_inliers)
        if return_matches and r.verified and v.inlier_points is not None and query_local is not None:
            pairs = v.result.inlier_pairs
            r.matches.query_points.CopyFrom(to_tensor(query_local[0][pairs[:, 0], :2].astype(np.float32)))
            r.matches.result_points.CopyFrom(to_tensor(np.asarray(v.inlier_points, dtype=np.float32)))

    async def get_features(
        self, hits: Sequence[Hit], deadline: Budget, *, want_local: bool = False, want_regional: bool = False
    ) -> dict[str, types_pb2.ImageFeatures]:
        """Stored features of ``hits``, GetFeatures calls of ``features_batch`` ids per owning
        shard (id → features), at most as many per call as fit the message limit at the
        feature limits (``features_bytes``), so that no response nears the message limit.

        A shard that fails is skipped: its images simply have no features here (the fan-out
        has already reported the shard as missing)."""
        per_image = features_bytes(limits.MAX_VECTOR_DIM, want_global=False, want_regional=want_regional, want_local=want_local)
        timeout, n = shard_timeout(deadline, self.config), min(self.config.features_batch, self.budget.items(per_image))
        responses = await asyncio.gather(
            *(self.shards[sid].get_features(
                shard_pb2.GetFeaturesRequest(shard_id=sid, ids=ids[i : i + n], want_local=want_local, want_regional=want_regional), timeout
            ) for sid, ids in ids_by_shard(hits).items() for i in range(0, len(ids), n)),
            return_exceptions=True,
        )
        return {
            image_id: f
            for resp in responses if not isinstance(resp, BaseException)
            for image_id, f in zip(resp.ids, resp.features)
        }

    async def regional_nodes(self, hits: list[Hit], deadline: Budget) -> RegionalNodes:
        """The whitened regional vectors of ``hits`` as graph nodes (in hit order).

        From the broker's regional copy (``services.broker.regional_copy``) where it holds the
        image, else read from its shard (images written since the last graph build): the same
        float16 values either way. When the copy holds every hit, its gathered block is the
        node matrix as it is (no second copy of ~25 MB per query)."""
        copy = self.collection.regional_copy
        ids = [h.image_id for h in hits]
        if copy is not None:
            positions, counts, block = copy.gather(ids)
        else:
            positions, counts, block = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
        held = set(positions.tolist())
        rest = [h for p, h in enumerate(hits) if p not in held]
        if not rest:
            return RegionalNodes(block, np.repeat(positions, counts))
        regions = dict(zip(positions.tolist(), np.split(block, np.cumsum(counts)[:-1]) if len(counts) else []))
        position = {h.image_id: p for p, h in enumerate(hits)}
        for image_id, f in (await self.get_features(rest, deadline, want_regional=True)).items():
            if f.regional.shape:
                regions[position[image_id]] = from_tensor(f.regional, field="regional").astype(np.float32)
        return RegionalNodes.stacked(sorted(regions.items()), dim=block.shape[1])

    async def verify(self, query_local: tuple[np.ndarray, np.ndarray], hits: list[Hit], params: VerifyParams,
                     deadline: Budget) -> list[VerifiedHit]:
        """Verify ``hits`` against the query's local features; returns them in reranked order
        (verified first by inliers). On the shards that hold them (``broker.verify_on=shards``)
        or here after reading their local features (``broker``): the same results either way.
        A candidate whose shard did not answer stays unverified (partial answer)."""
        if self.config.verify_on == "shards":
            outcomes = await self.verify_on_shards(query_local, hits, params, deadline)
        else:
            local = candidate_locals(await self.get_features(hits, deadline, want_local=True))
            outcomes = await verify_locally(query_local, hits, local, params, self.verify_pool)
        return rank_verified(hits, outcomes, params)

    async def verify_on_shards(self, query_local: tuple[np.ndarray, np.ndarray], hits: Sequence[Hit], params: VerifyParams,
                               deadline: Budget) -> dict[str, Outcome]:
        """Each owning shard verifies its own candidates (``Shard.Verify``): the query's local
        features go once per call with that shard's ids, as many per call as the answer's worst
        case fits the message limit. A shard that fails (or runs out of its budget: a call of n
        candidates may take ``shard_budget_s`` per ``VERIFY_PAIRS_PER_BUDGET`` of them) leaves its
        candidates unverified; an INVALID_ARGUMENT from a shard is the query's."""
        n = min(limits.MAX_VERIFY_IDS, self.budget.items(verified_candidate_bytes()))
        query_msg, params_msg = query_local_to_proto(query_local), params_to_proto(params)
        calls = [(sid, ids[i : i + n]) for sid, ids in ids_by_shard(hits).items() for i in range(0, len(ids), n)]

        async def one(sid: int, ids: list[str]) -> shard_pb2.ShardVerifyResponse:
            timeout = shard_timeout(deadline, self.config, queries=-(-len(ids) // VERIFY_PAIRS_PER_BUDGET))
            req = shard_pb2.ShardVerifyRequest(shard_id=sid, query=query_msg, ids=ids, params=params_msg, timeout_s=timeout)
            return await self.shards[sid].verify(req, timeout)

        answers = await asyncio.gather(*(one(sid, ids) for sid, ids in calls), return_exceptions=True)
        outcomes: dict[str, Outcome] = {}
        for (sid, _), ans in zip(calls, answers):
            if isinstance(ans, InvalidArgument):
                raise ans
            if isinstance(ans, BaseException):
                if not isinstance(ans, Exception):
                    raise ans
                log.warning("shard %d did not verify its candidates: %s", sid, failure_reason(ans))
                continue
            self.metrics.stage_seconds.labels("verify_shard").observe(ans.seconds)
            for i, r in enumerate(ans.results):
                outcomes[r.id] = result_from_proto(r, f"shard {sid}: results[{i}]")
        return outcomes
