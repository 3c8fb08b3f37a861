"""The public ``loupe.v1.Retrieval`` servicer: fan-out, merge, rerank, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import AsyncIterator, Awaitable, Callable, Sequence, TypeVar

import grpc
import numpy as np

from loupe.tensors import from_tensor, to_tensor
from loupe.v1 import extractor_pb2, retrieval_pb2, retrieval_pb2_grpc, shard_pb2, types_pb2
from services.broker.backends import ExtractorPool, GrpcShardClient, ShardClient
from services.broker.metrics import BrokerMetrics
from services.broker.shard_health import ShardHealth
from services.broker.topk import Hit, ids_by_shard, merge_topk
from services.common.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Overloaded,
    Unavailable,
    retry_trailer,
    status_for,
)
from services.common.grpc_server import RunningAioServer, ServerOptions, create_aio_server
from services.common.tls import InternalTls
from services.broker.collection_model import CollectionModel, region_node
from services.broker.graph_build import build_graphs
from services.broker.rerank_stages import DiffusionOutcome, diffusion_scores, dba_rescore, expand_query, hit_vectors, order_by
from services.broker.verification import VerifiedHit, candidate_locals, confidence, query_confidence, verify_hits
from services.space.whitening import PCAWhitening
from services.rerank.diffusion import DiffusionParams
from services.rerank.verify import VerifyParams
from services.space.placement import shard_for
from services.space.ids import check_id
from services.common import limits

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class BrokerConfig:
    """Limits and defaults of the public API.

    Attributes
    ----------
    default_timeout_s : float
        Budget of a call that arrives without a deadline.
    max_k, max_offset : int
        Upper bounds of ``k`` and ``offset``.
    max_batch_images : int
        Largest AddImages batch message.
    whitening_sample : int
        Default sample size of FitWhitening.
    index_local : bool
        Extract and store local features of every added image (needed by verification).
    verify_candidates : int
        Default number V of top candidates geometrically verified.
    max_verify_candidates : int
        Upper bound of a request's V.
    verify_threads : int
        Threads verifying candidate pairs in parallel.
    verify : VerifyParams
        Matching/RANSAC defaults.
    data_dir : str
        Where the collection model (local PCA, whitening) is persisted ("" = memory only).
    diffusion, regional_diffusion : DiffusionParams
        Defaults of global and regional diffusion.
    neighbourhood, regional_neighbourhood, max_neighbourhood : int
        Default (and maximum) truncated neighbourhood R diffused over.
    qe_n, qe_alpha : int, float
        αQE / DBA neighbours and weight exponent.
    dba_neighbourhood : int
        Neighbourhood augmented by DBA.
    shard_budget_fraction : float
        Each shard call (search, features) gets this fraction of the caller's remaining time;
        a shard slower than that is listed in ``missing_shards`` of a partial answer.
    shard_budget_s : float
        Absolute cap on a shard call's budget (0 = only the fraction); a shard search or a
        features batch takes milliseconds, so 2 s is slack, not a limit on healthy shards.
    max_inflight : int
        Calls the broker handles at once; beyond it RESOURCE_EXHAUSTED at once, with a retry hint.
    max_extract_queue : int
        Images allowed to wait for an extraction slot (2 per replica run at once); beyond it
        RESOURCE_EXHAUSTED at once, with a retry hint (0 = unbounded).
    retry_after_ms : int
        The hint: ``grpc-retry-pushback-ms`` trailer and message of an overload answer.
    shutdown_grace_s : float
        On SIGTERM/SIGINT the broker turns NOT_SERVING and lets calls in flight finish for up
        to this long before the actors stop.
    features_batch : int
        Ids per GetFeatures call (local/regional features of one image can be ~0.3 MB, so a
        batch of this size stays far below the message limit).
    shard_health_period_s, shard_health_timeout_s : float
        Every ``period`` the broker calls each shard's Stats (``timeout`` each) and sets
        ``loupe_shard_up{shard}`` (services/broker/shard_health.py).
    """

    default_timeout_s: float = 30.0
    max_k: int = 1000
    max_offset: int = 10_000
    max_batch_images: int = 256
    whitening_sample: int = 20_000
    index_local: bool = True
    verify_candidates: int = 100
    max_verify_candidates: int = 1000
    verify_threads: int = 2
    # min_inliers 16 measured best on the ROxford subset (4 → Medium 37.6, 10 → 43.1, 16 → 44.0)
    verify: VerifyParams = VerifyParams(min_inliers=16)
    data_dir: str = ""
    diffusion: DiffusionParams = DiffusionParams(k=50, kq=10, alpha=0.99, gamma=3.0)
    regional_diffusion: DiffusionParams = DiffusionParams(k=50, kq=10, alpha=0.99, gamma=3.0, aggregate="max")
    neighbourhood: int = 1000
    regional_neighbourhood: int = 1000
    max_neighbourhood: int = 5000
    max_graph_k: int = 200
    graph_page: int = 4096
    qe_n: int = 2
    qe_alpha: float = 3.0
    dba_neighbourhood: int = 1000
    shard_budget_fraction: float = 0.5
    shard_budget_s: float = 2.0
    max_inflight: int = 128
    max_extract_queue: int = 8  # measured: ~4 image searches/s per replica here → ≤ ~2 s of queueing
    retry_after_ms: int = 100
    features_batch: int = 32
    shutdown_grace_s: float = 5.0
    shard_health_period_s: float = 5.0
    shard_health_timeout_s: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.shard_budget_fraction <= 1:
            raise ValueError(f"broker.shard_budget_fraction must be in (0, 1], got {self.shard_budget_fraction}")
        for name in ("max_inflight", "features_batch"):
            if getattr(self, name) <= 0:
                raise ValueError(f"broker.{name} must be > 0, got {getattr(self, name)}")
        for name in ("default_timeout_s", "max_k", "max_batch_images", "whitening_sample", "verify_candidates", "verify_threads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"broker.{name} must be > 0, got {getattr(self, name)}")


class Deadline:
    """The caller's deadline as an absolute monotonic time."""

    def __init__(self, timeout_s: float | None, default_s: float) -> None:
        self.expires = time.monotonic() + (timeout_s if timeout_s is not None else default_s)

    def remaining(self) -> float:
        """Seconds left; raises DeadlineExceeded when none."""
        left = self.expires - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("deadline exceeded before the request finished")
        return left


class PerCallBudget:
    """No caller deadline on an open-ended stream: each backend call gets ``budget_s``."""

    def __init__(self, budget_s: float) -> None:
        self.budget_s = budget_s

    def remaining(self) -> float:
        return self.budget_s


class RetrievalServicer(retrieval_pb2_grpc.RetrievalServicer):
    """Broker: talks to extractor replicas and every shard; holds no image data itself."""

    def __init__(
        self,
        extractors: ExtractorPool,
        shards: Sequence[ShardClient],
        metrics: BrokerMetrics,
        config: BrokerConfig = BrokerConfig(),
    ) -> None:
        if not shards:
            raise ValueError("shards: at least one shard is required")
        ids = sorted(s.shard_id for s in shards)
        if ids != list(range(len(shards))):
            raise ValueError(f"shards: ids must be 0..{len(shards) - 1}, got {ids}")
        self.extractors = extractors
        self.shards = sorted(shards, key=lambda s: s.shard_id)
        self.metrics = metrics
        self.config = config
        self.collection = CollectionModel(config.data_dir)
        self.metrics.graph_images.set_function(lambda: len(self.collection.graph) if self.collection.graph is not None else 0)
        self._inflight = 0
        self._verify_pool = ThreadPoolExecutor(max_workers=config.verify_threads, thread_name_prefix="loupe-verify")

    # --- plumbing -------------------------------------------------------------------------
    async def _observe(self, method: str, context: grpc.aio.ServicerContext, body: Callable[[], Awaitable[T]]) -> T:
        """Run an RPC body with in-flight/latency/status metrics and the error → status table."""
        self.metrics.inflight.labels(method).inc()
        self._inflight += 1
        t0 = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            self._admit()
            return await body()
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            mapped = status_for(exc)
            if mapped is None:
                log.exception("internal error in %s", method)
                code = grpc.StatusCode.INTERNAL
                await context.abort(code, "internal error (see broker log)")
            code = mapped
            trailer = retry_trailer(exc, code)
            if trailer:
                context.set_trailing_metadata(trailer)
            await context.abort(code, str(exc))
            raise  # unreachable: abort raises
        finally:
            self._inflight -= 1
            self.metrics.inflight.labels(method).dec()
            self.metrics.request_seconds.labels(method).observe(time.perf_counter() - t0)
            self.metrics.requests.labels(method, code.name).inc()

    def _admit(self) -> None:
        """Admission control: beyond ``max_inflight`` calls, RESOURCE_EXHAUSTED at once, with a retry hint."""
        if self._inflight > self.config.max_inflight:
            raise Overloaded(
                f"broker: {self._inflight - 1} requests in flight, the limit is broker.max_inflight={self.config.max_inflight}; "
                f"retry after {self.config.retry_after_ms} ms",
                retry_after_ms=self.config.retry_after_ms,
            )

    def _shard_timeout(self, deadline: Deadline | PerCallBudget) -> float:
        """Budget of one shard call: a fraction of the caller's remaining time, so that a hung
        shard is reported missing (partial answer) while the caller still waits."""
        left = deadline.remaining()
        budget = left * self.config.shard_budget_fraction
        if self.config.shard_budget_s > 0:
            budget = min(budget, self.config.shard_budget_s)
        return max(budget, min(left, 0.05))

    def _deadline(self, context: grpc.aio.ServicerContext) -> Deadline:
        return Deadline(context.time_remaining(), self.config.default_timeout_s)

    @contextlib.contextmanager
    def _stage(self, name: str, timings: list[types_pb2.StageTiming]):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self.metrics.stage_seconds.labels(name).observe(dt)
            timings.append(types_pb2.StageTiming(stage=name, seconds=dt))

    async def _extract(self, request: extractor_pb2.ExtractRequest, deadline: Deadline | PerCallBudget) -> extractor_pb2.ExtractResponse:
        try:
            return await self.extractors.extract(request, deadline.remaining())
        except grpc.aio.AioRpcError as exc:
            raise _from_rpc_error(exc, "image") from None

    # --- Search ---------------------------------------------------------------------------
    async def Search(self, request: retrieval_pb2.SearchRequest, context: grpc.aio.ServicerContext) -> retrieval_pb2.SearchResponse:
        return await self._observe("Search", context, lambda: self._search(request, context))

    def _validate_search(self, request: retrieval_pb2.SearchRequest) -> None:
        if not 1 <= request.k <= self.config.max_k:
            raise InvalidArgument(f"k: must be in 1..{self.config.max_k}, got {request.k}")
        if not 0 <= request.offset <= self.config.max_offset:
            raise InvalidArgument(f"offset: must be in 0..{self.config.max_offset}, got {request.offset}")
        which = request.WhichOneof("query")
        if which is None:
            raise InvalidArgument("query: set either image or vector")
        if which == "image":
            limits.check_image_bytes(request.image, "image")
        else:
            limits.check_vector(request.vector, "vector")
        if request.HasField("crop"):
            if which != "image":
                raise InvalidArgument("crop: only an image query can be cropped")
            limits.check_crop(request.crop)

    async def _search(self, request: retrieval_pb2.SearchRequest, context: grpc.aio.ServicerContext) -> retrieval_pb2.SearchResponse:
        deadline = self._deadline(context)
        self._validate_search(request)
        plan = self._plan(request)
        timings: list[types_pb2.StageTiming] = []
        t_total = time.perf_counter()
        query_local, query_regions = None, None
        if request.WhichOneof("query") == "image":
            with self._stage("extract", timings):
                ext = await self._extract(
                    extractor_pb2.ExtractRequest(
                        image=request.image,
                        crop=request.crop if request.HasField("crop") else None,
                        want_local=plan.verify is not None,
                        want_regional=plan.regional,
                    ),
                    deadline,
                )
            feats = ext.features
            query = from_tensor(feats.__getattribute__("global"), field="features.global")
            if plan.verify is not None and feats.local.keypoints.shape and self.collection.local_pca is not None:
                query_local = (
                    from_tensor(feats.local.keypoints, field="keypoints"),
                    self.collection.project(from_tensor(feats.local.descriptors, field="descriptors")),
                )
            if plan.regional and feats.regional.shape:
                query_regions = self.collection.transform(from_tensor(feats.regional, field="regional"))
        else:
            if plan.verify is not None:
                raise InvalidArgument("rerank.verify: needs an image query (a vector has no local features)")
            if plan.regional:
                raise InvalidArgument("rerank.diffuse.regional: needs an image query (a vector has no regions)")
            query = _unit_vector(from_tensor(request.vector, field="vector"))
        depth = max(request.offset + request.k, plan.depth)
        with self._stage("fanout", timings):
            per_shard, missing = await self._fanout_search(query, depth, deadline, plan.need_vectors)
        with self._stage("merge", timings):
            hits = merge_topk(per_shard, depth)
        global_scores = {h.image_id: h.score for h in hits}
        if plan.qe or plan.dba:
            with self._stage("expand", timings):
                hits, more_missing = await self._expand(query, hits, plan, depth, deadline)
                missing = sorted(set(missing) | set(more_missing))
                global_scores = {h.image_id: h.score for h in hits} | global_scores
        verified: dict[str, VerifiedHit] = {}
        if plan.verify is not None and plan.diffuse_first and plan.diffusion is not None and hits:
            with self._stage("diffuse", timings):
                hits = await self._diffuse(query, query_regions, hits, plan, {}, deadline)
        if plan.verify is not None and query_local is not None and hits:
            with self._stage("verify", timings):
                hits, verified = await self._verify(query_local, hits, plan.n_verify, plan.verify, deadline)
        if plan.diffusion is not None and not plan.diffuse_first and hits:
            with self._stage("diffuse", timings):
                hits = await self._diffuse(query, query_regions, hits, plan, verified, deadline)
        resp = retrieval_pb2.SearchResponse(partial=bool(missing), missing_shards=missing)
        if missing:
            self.metrics.partial_responses.inc()
        if plan.verify is not None:
            resp.query_confidence = query_confidence(verified.values(), plan.verify.min_inliers)
            self.metrics.query_confidence.observe(resp.query_confidence)
        for hit in hits[request.offset : request.offset + request.k]:
            self._add_result(resp, hit, global_scores, verified.get(hit.image_id), plan, request.return_matches, query_local)
        dt = time.perf_counter() - t_total
        self.metrics.stage_seconds.labels("total").observe(dt)
        timings.append(types_pb2.StageTiming(stage="total", seconds=dt))
        resp.timings.extend(timings)
        return resp

    def _add_result(self, resp, hit: Hit, global_scores, v, plan: "SearchPlan", return_matches: bool, query_local) -> None:
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
        if return_matches and r.verified and v.candidate_points is not None:
            pairs = v.result.inlier_pairs
            r.matches.query_points.CopyFrom(to_tensor(query_local[0][pairs[:, 0], :2].astype(np.float32)))
            r.matches.result_points.CopyFrom(to_tensor(v.candidate_points[pairs[:, 1]].astype(np.float32)))

    def _plan(self, request: retrieval_pb2.SearchRequest) -> "SearchPlan":
        """Validate the rerank options and merge them over the server defaults."""
        ro = request.rerank
        verify = self._verify_params(ro.verify)
        diffusion, regional, neighbourhood = None, False, 0
        online_graph = False
        if ro.diffuse.enabled:
            d = ro.diffuse
            if d.neighbourhood < 0 or d.neighbourhood > self.config.max_neighbourhood:
                raise InvalidArgument(f"rerank.diffuse.neighbourhood: must be in 0..{self.config.max_neighbourhood}, got {d.neighbourhood}")
            limits.check_int_range(d.k, "rerank.diffuse.k", 0, self.config.max_graph_k)
            if d.alpha:
                limits.check_finite_range(d.alpha, "rerank.diffuse.alpha", 0.0, 1.0, lo_open=True, hi_open=True)
            if d.gamma:
                limits.check_finite_range(d.gamma, "rerank.diffuse.gamma", 0.0, limits.MAX_DIFFUSION_GAMMA, lo_open=True)
            regional = d.regional
            online_graph = d.online_graph
            base = self.config.regional_diffusion if regional else self.config.diffusion
            changes = {name: getattr(d, name) for name in ("k", "alpha", "gamma") if getattr(d, name)}
            try:
                diffusion = replace(base, **changes)
            except ValueError as exc:
                raise InvalidArgument(f"rerank.diffuse: {exc}") from None
            neighbourhood = d.neighbourhood or (self.config.regional_neighbourhood if regional else self.config.neighbourhood)
        e = ro.expand
        limits.check_int_range(e.n, "rerank.expand.n", 0, self.config.max_neighbourhood)
        limits.check_finite_range(e.alpha, "rerank.expand.alpha", 0.0, limits.MAX_EXPANSION_ALPHA)
        n_verify = (ro.verify.candidates or self.config.verify_candidates) if verify is not None else 0
        qe_n = e.n or self.config.qe_n
        depth = max(n_verify, neighbourhood, qe_n if e.query_expansion else 0, self.config.dba_neighbourhood if e.database_augmentation else 0)
        return SearchPlan(
            verify=verify,
            n_verify=n_verify,
            diffusion=diffusion,
            regional=regional,
            neighbourhood=neighbourhood,
            online_graph=online_graph,
            diffuse_first=ro.diffuse_first,
            qe=e.query_expansion,
            dba=e.database_augmentation,
            qe_n=qe_n,
            qe_alpha=e.alpha or self.config.qe_alpha,
            depth=depth,
        )

    async def _expand(self, query: np.ndarray, hits: list[Hit], plan: "SearchPlan", depth: int, deadline: Deadline):
        """αQE (second fan-out with the expanded query) and/or DBA re-scoring of the neighbourhood."""
        missing: list[int] = []
        q_w = self.collection.transform(query[None, :])[0]
        if plan.qe and hits:
            q_w = expand_query(q_w, hits, plan.qe_n, plan.qe_alpha)
            per_shard, missing = await self._fanout_search(q_w, depth, deadline, True, transformed=True)
            hits = merge_topk(per_shard, depth)
        if plan.dba and hits:
            n = min(len(hits), self.config.dba_neighbourhood)
            hits = dba_rescore(q_w, hits[:n], plan.qe_n, plan.qe_alpha) + hits[n:]
        return hits, missing

    async def _diffuse(self, query, query_regions, hits: list[Hit], plan: "SearchPlan", verified, deadline: Deadline) -> list[Hit]:
        """Rerank the top-R by diffusion; verified images (if any) seed it and stay on top."""
        head, tail = hits[: plan.neighbourhood], hits[plan.neighbourhood :]
        is_verified = [h.image_id in verified and verified[h.image_id].verified for h in head]
        seeds = {i: 1.0 for i, v in enumerate(is_verified) if v}
        loop = asyncio.get_running_loop()
        if plan.regional:
            regions = await self._regional_nodes(head, deadline)
            if query_regions is None or not regions:
                return hits
            graph = None if plan.online_graph else self.collection.regional_graph

            def run_regional() -> DiffusionOutcome:
                nodes = np.concatenate([r for _, r in regions])
                owner = np.repeat([i for i, _ in regions], [len(r) for _, r in regions])
                edges = None
                if graph is not None:
                    names = [region_node(head[i].image_id, j) for i, r in regions for j in range(len(r))]
                    edges = graph.neighbourhood_lists(names, nodes, plan.diffusion.k)
                # the query's (k-means-reduced) regions seed it jointly: one solve
                return diffusion_scores(query_regions, nodes, owner, len(head), plan.diffusion, seeds, edges)

            outcome = await loop.run_in_executor(None, run_regional)
        else:
            q = self.collection.transform(query[None, :])[0]
            vectors = hit_vectors(head)
            graph = None if plan.online_graph else self.collection.graph

            def run() -> DiffusionOutcome:
                edges = None if graph is None else graph.neighbourhood_lists([h.image_id for h in head], vectors, plan.diffusion.k)
                return diffusion_scores(q, vectors, None, len(head), plan.diffusion, seeds, edges)

            outcome = await loop.run_in_executor(None, run)
        self.metrics.diffusion_iterations.observe(outcome.iterations)
        if not verified:
            return order_by(head, outcome.scores) + tail
        # verified keep their (inlier) order on top; the rest follow by diffusion score
        top = [h for h, v in zip(head, is_verified) if v]
        rest_idx = [i for i, v in enumerate(is_verified) if not v]
        rest = order_by([head[i] for i in rest_idx], outcome.scores[rest_idx])
        return top + rest + tail

    async def _get_features(
        self, hits: Sequence[Hit], deadline: Deadline, *, want_local: bool = False, want_regional: bool = False
    ) -> dict[str, types_pb2.ImageFeatures]:
        """Stored features of ``hits``, GetFeatures calls of ``features_batch`` ids per owning
        shard (id → features), so that no response nears the message limit.

        A shard that fails is skipped: its images simply have no features here (the fan-out
        has already reported the shard as missing)."""
        timeout, n = self._shard_timeout(deadline), self.config.features_batch
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

    async def _regional_nodes(self, hits: list[Hit], deadline: Deadline) -> list[tuple[int, np.ndarray]]:
        """Whitened ``(R_i, D')`` regional vectors of ``hits``, with the position of their image in ``hits``."""
        features = await self._get_features(hits, deadline, want_regional=True)
        return [
            (i, from_tensor(features[h.image_id].regional, field="regional").astype(np.float32))
            for i, h in enumerate(hits)
            if h.image_id in features and features[h.image_id].regional.shape
        ]

    def _verify_params(self, opts: retrieval_pb2.VerifyOptions) -> VerifyParams | None:
        """Request options merged over the server defaults (None when the stage is off)."""
        if not opts.enabled:
            return None
        if opts.candidates < 0 or opts.candidates > self.config.max_verify_candidates:
            raise InvalidArgument(f"rerank.verify.candidates: must be in 0..{self.config.max_verify_candidates}, got {opts.candidates}")
        if opts.min_inliers < 0:
            raise InvalidArgument(f"rerank.verify.min_inliers: must be >= 0, got {opts.min_inliers}")
        changes: dict[str, object] = {}
        if opts.model:
            if opts.model not in limits.VERIFY_MODELS:
                raise InvalidArgument(f"rerank.verify.model: must be one of {list(limits.VERIFY_MODELS)}, got {opts.model[:32]!r}")
            changes["model"] = opts.model
        if opts.min_inliers:
            changes["min_inliers"] = opts.min_inliers
        try:
            return replace(self.config.verify, **changes)
        except ValueError as exc:
            raise InvalidArgument(f"rerank.verify: {exc}") from None

    async def _verify(self, query_local, hits: list[Hit], n_verify: int, params: VerifyParams, deadline: Deadline):
        """Verify the top ``n_verify`` hits; returns (reordered hits, id → VerifiedHit)."""
        head, tail = hits[:n_verify], hits[n_verify:]

        local = candidate_locals(await self._get_features(head, deadline, want_local=True))
        ranked = await verify_hits(query_local, head, local, params, self._verify_pool)
        self.metrics.verify_candidates.inc(sum(1 for v in ranked if v.result is not None))
        self.metrics.verify_verified.inc(sum(1 for v in ranked if v.verified))
        return [v.hit for v in ranked] + tail, {v.hit.image_id: v for v in ranked}

    async def _fanout_search(
        self, query: np.ndarray, depth: int, deadline: Deadline, return_vectors: bool = False, transformed: bool = False
    ) -> tuple[list[list[Hit]], list[int]]:
        """Ask every shard for its top-``depth``; returns per-shard hit lists and missing shard ids."""
        tensor = to_tensor(query.astype(np.float32))

        async def one(shard: ShardClient) -> list[Hit]:
            timeout = self._shard_timeout(deadline)
            req = shard_pb2.ShardSearchRequest(
                shard_id=shard.shard_id, query=tensor, top_k=depth, timeout_s=timeout,
                return_vectors=return_vectors, query_transformed=transformed,
            )
            resp = await shard.search(req, timeout)
            vectors = from_tensor(resp.vectors, field="vectors") if return_vectors and resp.vectors.shape else None
            return [
                Hit(score, image_id, shard.shard_id, dict(md.values) if md is not None and md.values else None,
                    vectors[i] if vectors is not None else None)
                for i, (image_id, score, md) in enumerate(zip(resp.ids, resp.scores, _padded(resp.metadata, len(resp.ids))))
            ]

        results = await asyncio.gather(*(one(s) for s in self.shards), return_exceptions=True)
        lists, missing = [], []
        for shard, res in zip(self.shards, results):
            if isinstance(res, BaseException):
                if isinstance(res, grpc.aio.AioRpcError) and res.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise InvalidArgument(res.details() or "invalid query") from None
                reason = res.code().name if isinstance(res, grpc.aio.AioRpcError) else type(res).__name__
                self.metrics.shard_failures.labels(str(shard.shard_id), reason).inc()
                log.warning("shard %d failed: %s", shard.shard_id, reason)
                missing.append(shard.shard_id)
            else:
                lists.append(res)
        if len(missing) == len(self.shards):
            deadline.remaining()  # a deadline that ran out is reported as such
            raise Unavailable("no shard answered the search")
        return lists, missing

    # --- AddImages ------------------------------------------------------------------------
    async def AddImages(
        self, request_iterator: AsyncIterator[retrieval_pb2.AddImagesRequest], context: grpc.aio.ServicerContext
    ) -> retrieval_pb2.AddImagesResponse:
        return await self._observe("AddImages", context, lambda: self._add_images(request_iterator, context))

    async def _add_images(
        self, request_iterator: AsyncIterator[retrieval_pb2.AddImagesRequest], context: grpc.aio.ServicerContext
    ) -> retrieval_pb2.AddImagesResponse:
        if context.time_remaining() is None:  # an open-ended stream: bound each backend call instead
            deadline: Deadline | PerCallBudget = PerCallBudget(self.config.default_timeout_s)
        else:
            deadline = self._deadline(context)
        t0 = time.perf_counter()
        added = 0
        batch_no = 0
        async for batch in request_iterator:
            if len(batch.images) > self.config.max_batch_images:
                raise InvalidArgument(
                    f"images: batch {batch_no} has {len(batch.images)} images, the limit is {self.config.max_batch_images}"
                )
            try:
                added += await self._add_batch(batch, batch_no, deadline)
            except (InvalidArgument, Unavailable, Overloaded, DeadlineExceeded, FailedPrecondition) as exc:
                err = type(exc)(f"{exc} ({added} images of earlier batches were stored)")
                if isinstance(exc, Overloaded):
                    err.retry_after_ms = exc.retry_after_ms
                raise err from None
            batch_no += 1
        return retrieval_pb2.AddImagesResponse(added=added, seconds=time.perf_counter() - t0)

    async def _add_batch(self, batch: retrieval_pb2.AddImagesRequest, batch_no: int, deadline: Deadline | PerCallBudget) -> int:
        self.metrics.add_batch_images.observe(len(batch.images))
        seen: set[str] = set()
        for i, rec in enumerate(batch.images):
            check_id(rec.id, f"images[{i}].id")
            if rec.id in seen:
                raise InvalidArgument(f"images[{i}].id: duplicate id {rec.id!r} in one batch")
            seen.add(rec.id)
            limits.check_image_bytes(rec.image, f"images[{i}].image (id {rec.id!r})")
            limits.check_metadata(rec.metadata, f"images[{i}].metadata (id {rec.id!r})")
        # Extract everything first: a bad image fails the batch before any of it is written.
        sem = asyncio.Semaphore(self.extractors.concurrency)

        async def extract(i: int, rec: retrieval_pb2.ImageRecord) -> types_pb2.ImageFeatures:
            async with sem:
                try:
                    req = extractor_pb2.ExtractRequest(image=rec.image, want_regional=True, want_local=self.config.index_local)
                    return (await self._extract(req, deadline)).features
                except InvalidArgument as exc:
                    raise InvalidArgument(f"images[{i}] (id {rec.id!r}): {exc}") from None

        t_ext = time.perf_counter()
        features = await asyncio.gather(*(extract(i, r) for i, r in enumerate(batch.images)))
        self.metrics.stage_seconds.labels("extract").observe(time.perf_counter() - t_ext)
        if self.config.index_local:
            self._project_local(features)
        by_shard: dict[int, shard_pb2.ShardAddRequest] = {}
        for rec, feat in zip(batch.images, features):
            sid = shard_for(rec.id, len(self.shards))
            req = by_shard.setdefault(sid, shard_pb2.ShardAddRequest(shard_id=sid))
            req.records.add(id=rec.id, features=feat, metadata=dict(rec.metadata))

        async def write(sid: int, req: shard_pb2.ShardAddRequest) -> int:
            try:
                return (await self.shards[sid].add(req, deadline.remaining())).stored
            except grpc.aio.AioRpcError as exc:
                raise _from_rpc_error(exc, f"shard {sid}") from None

        self.collection.graph_forget([rec.id for rec in batch.images])  # replaced images leave the graph
        outcomes = await asyncio.gather(*(write(s, r) for s, r in by_shard.items()), return_exceptions=True)
        n = int(sum(o for o in outcomes if not isinstance(o, BaseException)))
        self.metrics.images_added.inc(n)
        failed = [(sid, o) for sid, o in zip(by_shard, outcomes) if isinstance(o, BaseException)]
        if failed:
            raise _partial_write_error(by_shard, outcomes, failed[0][1])
        return n

    def _project_local(self, features: Sequence[types_pb2.ImageFeatures]) -> None:
        """Replace raw local descriptors by their collection-PCA projection (learned on first use)."""
        raw = [from_tensor(f.local.descriptors, field="descriptors") if f.local.descriptors.shape else None for f in features]
        present = [r for r in raw if r is not None and len(r)]
        if not present:
            return
        if self.collection.local_pca is None:
            self.collection.ensure_local_pca(present)
        for f, r in zip(features, raw):
            if r is not None and len(r):
                f.local.descriptors.CopyFrom(to_tensor(self.collection.project(r).astype(np.float16)))

    # --- Delete ---------------------------------------------------------------------------
    async def Delete(self, request: retrieval_pb2.DeleteRequest, context: grpc.aio.ServicerContext) -> retrieval_pb2.DeleteResponse:
        return await self._observe("Delete", context, lambda: self._delete(request, context))

    async def _delete(self, request: retrieval_pb2.DeleteRequest, context: grpc.aio.ServicerContext) -> retrieval_pb2.DeleteResponse:
        deadline = self._deadline(context)
        if not request.ids:
            raise InvalidArgument("ids: at least one id is required")
        if len(request.ids) > limits.MAX_DELETE_IDS:
            raise InvalidArgument(f"ids: {len(request.ids)} ids, the limit is {limits.MAX_DELETE_IDS} per request")
        by_shard: dict[int, list[str]] = {}
        for i, image_id in enumerate(request.ids):
            check_id(image_id, f"ids[{i}]")
            by_shard.setdefault(shard_for(image_id, len(self.shards)), []).append(image_id)

        async def one(sid: int, ids: list[str]) -> shard_pb2.ShardDeleteResponse:
            try:
                return await self.shards[sid].delete(shard_pb2.ShardDeleteRequest(shard_id=sid, ids=ids), deadline.remaining())
            except grpc.aio.AioRpcError as exc:
                raise _from_rpc_error(exc, f"shard {sid}") from None

        results = await asyncio.gather(*(one(s, ids) for s, ids in by_shard.items()))
        self.collection.graph_forget(list(request.ids))
        resp = retrieval_pb2.DeleteResponse()
        for r in results:
            resp.deleted.extend(r.deleted)
            resp.missing.extend(r.missing)
        if not resp.deleted:
            raise NotFound(f"ids: none of {list(request.ids)[:5]} exists")
        return resp

    # --- GetStats -------------------------------------------------------------------------
    async def GetStats(self, request: retrieval_pb2.GetStatsRequest, context: grpc.aio.ServicerContext) -> retrieval_pb2.GetStatsResponse:
        return await self._observe("GetStats", context, lambda: self._get_stats(context))

    async def _get_stats(self, context: grpc.aio.ServicerContext) -> retrieval_pb2.GetStatsResponse:
        deadline = self._deadline(context)
        results = await asyncio.gather(*(s.stats(min(5.0, deadline.remaining())) for s in self.shards), return_exceptions=True)
        graph, regional = self.collection.graph, self.collection.regional_graph
        resp = retrieval_pb2.GetStatsResponse(
            extractors=self.extractors.addresses,
            graph_images=len(graph) if graph is not None else 0,
            graph_regions=len(regional) if regional is not None else 0,
        )
        for shard, res in zip(self.shards, results):
            st = resp.shards.add(shard_id=shard.shard_id, address=shard.address, healthy=not isinstance(res, BaseException))
            if isinstance(res, BaseException):
                continue
            st.images, st.feature_bytes = res.images, res.feature_bytes
            st.regional_vectors, st.local_features = res.regional_vectors, res.local_features
            st.store_bytes, st.index_bytes, st.index, st.startup_seconds = res.store_bytes, res.index_bytes, res.index, res.startup_seconds
            resp.images += res.images
            resp.dim = max(resp.dim, res.dim)
            resp.whitened = resp.whitened or res.whitened
            self.metrics.shard_vectors.labels(str(shard.shard_id)).set(res.images)
            self.metrics.shard_store_bytes.labels(str(shard.shard_id)).set(res.store_bytes)
        with contextlib.suppress(Unavailable, grpc.aio.AioRpcError):
            d = await self.extractors.describe(min(5.0, deadline.remaining()))
            resp.model = f"{d.backbone} {d.pooling} D={d.dim} scales={[round(s, 3) for s in d.scales]} max_side={d.max_side}"
        return resp

    # --- FitWhitening ---------------------------------------------------------------------
    async def FitWhitening(self, request: retrieval_pb2.FitWhiteningRequest, context: grpc.aio.ServicerContext) -> retrieval_pb2.FitWhiteningResponse:
        return await self._observe("FitWhitening", context, lambda: self._fit_whitening(request, context))

    async def _fit_whitening(self, request: retrieval_pb2.FitWhiteningRequest, context: grpc.aio.ServicerContext) -> retrieval_pb2.FitWhiteningResponse:
        deadline = self._deadline(context)
        limits.check_int_range(request.max_vectors, "max_vectors", 0, limits.MAX_WHITENING_SAMPLE)
        limits.check_int_range(request.dim, "dim", 0, limits.MAX_VECTOR_DIM)
        payload = b""
        sample = 0
        dim = 0
        if not request.remove:
            per_shard = max(1, (request.max_vectors or self.config.whitening_sample) // len(self.shards))
            samples = await asyncio.gather(
                *(s.sample_vectors(shard_pb2.SampleVectorsRequest(shard_id=s.shard_id, max_vectors=per_shard, seed=i), deadline.remaining())
                  for i, s in enumerate(self.shards))
            )
            x = np.concatenate([from_tensor(s.vectors, field="vectors") for s in samples if s.vectors.shape])
            if len(x) < 2:
                raise FailedPrecondition(f"collection: {len(x)} images indexed, whitening needs at least 2")
            if request.dim > x.shape[1]:
                raise InvalidArgument(f"dim: must be <= the indexed dimension {x.shape[1]}, got {request.dim}")
            w = PCAWhitening()
            w.fit(x, dim=request.dim or None)
            payload, sample, dim = w.to_bytes(), len(x), w.output_dim
        await asyncio.gather(
            *(s.set_whitening(shard_pb2.SetWhiteningRequest(shard_id=s.shard_id, whitening=payload), deadline.remaining()) for s in self.shards)
        )
        self.collection.set_whitening(PCAWhitening.from_bytes(payload) if payload else None)
        return retrieval_pb2.FitWhiteningResponse(sample_size=sample, dim=dim)

    # --- BuildGraph -----------------------------------------------------------------------
    async def BuildGraph(self, request: retrieval_pb2.BuildGraphRequest, context: grpc.aio.ServicerContext) -> retrieval_pb2.BuildGraphResponse:
        return await self._observe("BuildGraph", context, lambda: self._build_graph(request, context))

    async def _build_graph(self, request: retrieval_pb2.BuildGraphRequest, context: grpc.aio.ServicerContext) -> retrieval_pb2.BuildGraphResponse:
        deadline = self._deadline(context)
        if request.k < 0 or request.k > self.config.max_graph_k:
            raise InvalidArgument(f"k: must be in 0..{self.config.max_graph_k}, got {request.k}")
        if request.remove:
            self.collection.set_graph(None)
            return retrieval_pb2.BuildGraphResponse()
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        k = request.k or self.config.diffusion.k
        graph, regional, how = await build_graphs(
            self.shards, self.collection.transform, k=k, regional_k=request.k or self.config.regional_diffusion.k,
            page=self.config.graph_page, timeout=deadline.remaining,
            on_error=lambda exc, shard: _from_rpc_error(exc, f"shard {shard.shard_id}"),
            run=lambda fn, *args: loop.run_in_executor(None, fn, *args),
        )
        if graph is None:
            raise FailedPrecondition("collection: fewer than 2 images indexed, a graph needs at least 2")
        log.info("collection graphs built in %.1f s: global %s (%d images), regional %s", time.perf_counter() - t0,
                 how["global"], len(graph), how["regional"])
        self.collection.set_graph(graph, regional)
        return retrieval_pb2.BuildGraphResponse(
            images=len(graph), k=graph.k, bytes=graph.nbytes + (regional.nbytes if regional else 0),
            seconds=time.perf_counter() - t0, regions=len(regional) if regional else 0,
        )


@dataclass(frozen=True)
class SearchPlan:
    """What one search runs, after validation and defaults."""

    verify: VerifyParams | None
    n_verify: int
    diffusion: DiffusionParams | None
    regional: bool
    online_graph: bool  # global: build the neighbourhood graph per query despite a collection graph
    neighbourhood: int
    diffuse_first: bool
    qe: bool
    dba: bool
    qe_n: int
    qe_alpha: float
    depth: int

    @property
    def need_vectors(self) -> bool:
        return self.qe or self.dba or (self.diffusion is not None and not self.regional)


def _unit_vector(v: np.ndarray) -> np.ndarray:
    """Validate a client-supplied raw descriptor and L2-normalise it."""
    if v.ndim != 1 or not np.all(np.isfinite(v)):
        raise InvalidArgument(f"vector: expected a finite (D,) vector, got shape {list(v.shape)}")
    norm = float(np.linalg.norm(v))
    if norm == 0:
        raise InvalidArgument("vector: must not be all zeros")
    return v / norm


def _padded(seq: Sequence[T], n: int) -> list[T | None]:
    out: list[T | None] = list(seq)[:n]
    return out + [None] * (n - len(out))


def _partial_write_error(by_shard: dict[int, shard_pb2.ShardAddRequest], outcomes: Sequence[object], first: BaseException) -> BaseException:
    """The first shard failure of a batch, its message extended by which ids were stored.

    A batch is split by shard; shards that answered stored their ids (idempotent upsert: the
    caller may resend the whole request, or only the ids listed as not stored)."""
    if not isinstance(first, Exception) or status_for(first) is None:
        return first
    stored = [r.id for req, o in zip(by_shard.values(), outcomes) if not isinstance(o, BaseException) for r in req.records]
    lost = [r.id for req, o in zip(by_shard.values(), outcomes) if isinstance(o, BaseException) for r in req.records]
    cap = 50
    msg = (f"{first}; of this batch {len(stored)} images were stored: {stored[:cap]}{' ...' if len(stored) > cap else ''}; "
           f"not confirmed (resend them): {lost[:cap]}{' ...' if len(lost) > cap else ''}")
    err = type(first)(msg)
    if isinstance(first, Overloaded):
        err.retry_after_ms = first.retry_after_ms
    return err


def _from_rpc_error(exc: grpc.aio.AioRpcError, what: str) -> Exception:
    """Re-raise a backend's status as the matching domain error, prefixed with ``what``."""
    code = exc.code()
    msg = f"{what}: {exc.details()}"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(exc.details() or msg)  # backends already name the field
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        busy = "concurrent rpc limit" in (exc.details() or "").lower()  # the backend's gRPC admission limit: transient
        return Overloaded(exc.details() or msg, retry_after_ms=100 if busy else None)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(msg)
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(msg)
    return Unavailable(msg)


@dataclass
class RunningBroker:
    """A started broker: gRPC server, its servicer and the metrics exporter."""

    server: RunningAioServer
    servicer: RetrievalServicer
    metrics_port: int
    shard_health: ShardHealth | None = None

    @property
    def port(self) -> int:
        return self.server.port

    async def stop(self, grace_s: float = 2.0) -> None:
        """Graceful stop: NOT_SERVING, drain, close backend channels and the exporter."""
        await self.server.stop(grace_s)
        if self.shard_health is not None:
            await self.shard_health.stop()
        self.servicer._verify_pool.shutdown(wait=False)
        await self.servicer.extractors.close()
        for s in self.servicer.shards:
            await s.close()
        self.servicer.metrics.close()


async def create_server(
    extractor_addresses: Sequence[str],
    shard_addresses: Sequence[str],
    opts: ServerOptions,
    *,
    metrics_host: str = "127.0.0.1",
    metrics_port: int = 0,
    config: BrokerConfig = BrokerConfig(),
    internal_token: str = "",
    internal_tls: InternalTls | None = None,
) -> RunningBroker:
    """Start the public Retrieval server (asyncio) and its ``/metrics`` exporter.

    ``shard_addresses[i]`` is the address of shard ``i``; ``internal_token`` ("" = none) is
    sent with every call to shards and extractors, over mutual TLS when ``internal_tls`` is set.
    """
    channel_opts = opts.channel_options()
    metrics = BrokerMetrics.create()
    servicer = RetrievalServicer(
        ExtractorPool(extractor_addresses, channel_opts, internal_token=internal_token, tls=internal_tls,
                      max_queue=config.max_extract_queue, retry_after_ms=config.retry_after_ms),
        [GrpcShardClient(i, a, channel_opts, internal_token, internal_tls) for i, a in enumerate(shard_addresses)],
        metrics,
        config,
    )
    server = await create_aio_server(
        lambda s: retrieval_pb2_grpc.add_RetrievalServicer_to_server(servicer, s), ["loupe.v1.Retrieval"], opts
    )
    mport = metrics.serve(metrics_host, metrics_port)
    health = ShardHealth(servicer.shards, metrics, config.shard_health_period_s, config.shard_health_timeout_s).start()
    return RunningBroker(server, servicer, mport, health)
