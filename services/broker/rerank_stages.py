"""The broker's rerank stages: one object per stage, run in order by the search pipeline.

``services.broker.search_plan.build_plan`` turns a request's rerank options into an ordered
tuple of stage objects once (validated, merged over the server defaults); the pipeline then
runs ``for stage in plan.stages: if stage.applies(state): await stage.run(backend, state)``.
A stage reads and updates the ``RerankState`` (the ranking, the verified candidates, the
shards that did not answer) and reaches shards and models only through ``RerankBackend``
(the pipeline), so each stage is tested with a fake backend. A new rerank variant is a new
stage class and one line in ``build_plan``.

The pure functions below (αQE, DBA, ordering helpers) hold no I/O.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Protocol, Sequence

import numpy as np

from services.broker.collection_model import CollectionModel, region_node
from services.broker.topk import Hit, merge_topk
from services.rerank.diffusion import DiffusionOutcome, DiffusionParams, diffusion_rerank
from services.rerank.expansion import alpha_qe, dba
from services.rerank.verify import VerifyParams

if TYPE_CHECKING:
    from services.broker.deadlines import Deadline, PerCallBudget
    from services.broker.metrics import BrokerMetrics
    from services.broker.query import Query
    from services.broker.verification import VerifiedHit

    Budget = Deadline | PerCallBudget


def hit_vectors(hits: Sequence[Hit]) -> np.ndarray:
    """(n, D') indexed vectors of hits (shards return them when asked)."""
    return np.stack([np.asarray(h.vector, dtype=np.float32) for h in hits])


def expand_query(query: np.ndarray, hits: Sequence[Hit], n: int, alpha: float) -> np.ndarray:
    """αQE: ``(D',)`` expanded query from the top ``n`` hits."""
    if not hits:
        return query
    return alpha_qe(query, hit_vectors(hits[:n]), n=n, alpha=alpha)


def dba_rescore(query: np.ndarray, hits: Sequence[Hit], k: int, alpha: float) -> list[Hit]:
    """DBA within the neighbourhood, then re-score every hit by ``q · x'`` and re-sort."""
    if len(hits) < 2:
        return list(hits)
    augmented = dba(hit_vectors(hits), k=k, alpha=alpha)
    scores = augmented @ query
    order = np.argsort(-scores, kind="stable")
    return [dataclasses.replace(hits[i], score=float(scores[i]), vector=augmented[i]) for i in order]


def order_by(hits: Sequence[Hit], scores: np.ndarray) -> list[Hit]:
    """Hits re-sorted by ``scores`` (stable), with ``score`` replaced."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    values = np.asarray(scores, dtype=np.float64)[order].tolist()
    # the constructor, not dataclasses.replace: ~5x cheaper for the 1,000 hits a diffusion reorders
    return [Hit(v, hits[i].image_id, hits[i].shard_id, hits[i].payload, hits[i].vector) for i, v in zip(order.tolist(), values)]


@dataclass(frozen=True)
class RegionalNodes:
    """The regional vectors of a list of hits as graph nodes.

    Attributes
    ----------
    vectors : ndarray ``(N, D')`` float32
        Every node's whitened regional vector, the nodes of one image together, images in hit order.
    owner : ndarray ``(N,)`` int64
        The position in the hits of each node's image (non-decreasing).
    """

    vectors: np.ndarray
    owner: np.ndarray

    @classmethod
    def stacked(cls, regions: Sequence[tuple[int, np.ndarray]], dim: int = 0) -> RegionalNodes:
        """From ``(position in the hits, (R_i, D') regional vectors)`` pairs in hit order (one copy)."""
        regions = [(i, r) for i, r in regions if len(r)]
        if not regions:
            return cls(np.zeros((0, dim), np.float32), np.zeros(0, np.int64))
        return cls(np.concatenate([np.asarray(r, np.float32) for _, r in regions]),
                   np.repeat(np.array([i for i, _ in regions], np.int64), [len(r) for _, r in regions]))

    def __len__(self) -> int:
        return len(self.owner)

    def rank_in_image(self) -> np.ndarray:
        """``(N,)`` each node's index among its image's nodes (``j`` of ``region_node(id, j)``)."""
        if not len(self.owner):
            return np.zeros(0, np.int64)
        first = np.flatnonzero(np.r_[True, self.owner[1:] != self.owner[:-1]])
        return np.arange(len(self.owner)) - np.repeat(first, np.diff(np.r_[first, len(self.owner)]))


def regional_match_scores(query: np.ndarray, global_scores: np.ndarray, nodes: RegionalNodes) -> np.ndarray:
    """Global score plus the best regional similarity (regional matching).

    ``query``: ``(D',)`` indexed-space global vector; ``global_scores``: ``(n,)`` the hits'
    global scores; ``nodes``: the hits' regional vectors. Returns ``(n,)`` ``g + max_r q·r``
    (``g`` alone for a hit without regions).
    """
    scores = np.asarray(global_scores, dtype=np.float32).copy()
    if len(nodes):
        best = np.full(len(scores), -np.inf, dtype=np.float32)
        np.maximum.at(best, nodes.owner, nodes.vectors @ np.asarray(query, dtype=np.float32))
        has = np.isfinite(best)
        scores[has] += best[has]
    return scores


def union_candidates(diffused: list[Hit], global_order: list[Hit], n: int) -> tuple[list[Hit], int]:
    """Verification candidates from two shortlists: the diffused top-``n``, then the global
    top-``n`` not among them.

    Returns
    -------
    (hits, m)
        ``diffused`` reordered so that its first ``m`` entries are the union (diffused order
        first), then the rest in diffused order; ``m`` ≤ 2n.
    """
    head = diffused[:n]
    ids = {h.image_id for h in head}
    by_id = {h.image_id: h for h in diffused}
    extra = [by_id.get(h.image_id, h) for h in global_order[:n] if h.image_id not in ids]
    extra_ids = {h.image_id for h in extra}
    rest = [h for h in diffused[n:] if h.image_id not in extra_ids]
    return head + extra + rest, len(head) + len(extra)


def verified_first(ranked: list[Hit], verified: dict, order: list[Hit]) -> list[Hit]:
    """Verified hits in ``ranked``'s (inlier) order, then every other hit of ``order`` in its order.

    ``verified`` maps image id → an object with a boolean ``verified`` attribute."""
    top = [h for h in ranked if h.image_id in verified and verified[h.image_id].verified]
    ids = {h.image_id for h in top}
    return top + [h for h in order if h.image_id not in ids]


# --- stage objects ---------------------------------------------------------------------------


@dataclass
class RerankState:
    """What the stages hand on to each other for one query.

    Attributes
    ----------
    query : Query
        The query (global vector, local features, regions, excluded id, filter).
    hits : list of Hit
        The current ranking, best first.
    depth : int
        Candidates of a (second) fan-out.
    deadline : Deadline or PerCallBudget
        The query's budget.
    global_order : list of Hit
        The ranking before any verification or diffusion (after expansion).
    global_scores : dict
        Image id → first-stage (global) score, reported per result.
    verified : dict
        Image id → ``VerifiedHit`` of every verified candidate (empty until verification).
    missing : set of int
        Shards that did not answer a fan-out of this query.
    """

    query: "Query"
    hits: list[Hit]
    depth: int
    deadline: "Budget"
    global_order: list[Hit] = field(default_factory=list)
    global_scores: dict[str, float] = field(default_factory=dict)
    verified: dict[str, "VerifiedHit"] = field(default_factory=dict)
    missing: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        if not self.global_order:
            self.global_order = self.hits
        if not self.global_scores:
            self.global_scores = {h.image_id: h.score for h in self.hits}

    @property
    def any_verified(self) -> bool:
        """Whether verification found at least one match."""
        return any(v.verified for v in self.verified.values())

    def is_verified(self, image_id: str) -> bool:
        v = self.verified.get(image_id)
        return v is not None and v.verified


class RerankBackend(Protocol):
    """What stages need from the broker (``SearchPipeline`` implements it)."""

    collection: CollectionModel
    metrics: "BrokerMetrics"

    async def fanout(self, query: np.ndarray, depth: int, deadline: "Budget", return_vectors: bool = False, transformed: bool = False,
                     flt=None) -> tuple[list[list[Hit]], list[int]]: ...

    async def regional_nodes(self, hits: list[Hit], deadline: "Budget") -> RegionalNodes: ...

    async def verify(self, query_local: tuple[np.ndarray, np.ndarray], hits: list[Hit], params: VerifyParams,
                     deadline: "Budget") -> list["VerifiedHit"]: ...


class Stage(Protocol):
    """One rerank stage."""

    name: ClassVar[str]  # the stage's timing label (loupe_broker_stage_seconds{stage}, the response's timings)
    needs_vectors: ClassVar[bool]  # the fan-out must return each hit's indexed vector

    def applies(self, state: RerankState) -> bool: ...

    async def run(self, backend: RerankBackend, state: RerankState) -> None: ...


def _whitened_query(backend: RerankBackend, query: "Query") -> np.ndarray:
    return backend.collection.transform(query.vector[None, :])[0]


@dataclass(frozen=True)
class Expand:
    """αQE (a second fan-out with the expanded query) and/or DBA re-scoring of the neighbourhood.

    Its ranking becomes the global order the later stages start from."""

    name: ClassVar[str] = "expand"
    needs_vectors: ClassVar[bool] = True
    qe: bool
    dba: bool
    n: int
    alpha: float
    dba_neighbourhood: int

    def applies(self, state: RerankState) -> bool:
        return True

    async def run(self, backend: RerankBackend, state: RerankState) -> None:
        q = state.query
        hits = state.hits
        q_w = _whitened_query(backend, q)
        if self.qe and hits:
            q_w = expand_query(q_w, hits, self.n, self.alpha)
            per_shard, missing = await backend.fanout(q_w, state.depth, state.deadline, True, transformed=True, flt=q.filter)
            state.missing.update(missing)
            hits = [h for h in merge_topk(per_shard, state.depth) if h.image_id != q.exclude]
        if self.dba and hits:
            n = min(len(hits), self.dba_neighbourhood)
            hits = dba_rescore(q_w, hits[:n], self.n, self.alpha) + hits[n:]
        state.hits = state.global_order = hits
        state.global_scores = {h.image_id: h.score for h in hits} | state.global_scores


@dataclass(frozen=True)
class RegionalMatch:
    """Rescore the top-``neighbourhood`` by global score + the best similarity of the query's
    global vector to one of the image's regional vectors (``regional_match_scores``): a query
    crop showing part of a database photo matches one of its regions. Its ranking becomes the
    global order the later stages start from; the reported global scores stay the plain ones."""

    name: ClassVar[str] = "regional_match"
    needs_vectors: ClassVar[bool] = False
    neighbourhood: int

    def applies(self, state: RerankState) -> bool:
        return bool(state.hits)

    async def run(self, backend: RerankBackend, state: RerankState) -> None:
        head, tail = state.hits[: self.neighbourhood], state.hits[self.neighbourhood :]
        nodes = await backend.regional_nodes(head, state.deadline)
        q = _whitened_query(backend, state.query)
        scores = regional_match_scores(q, np.array([h.score for h in head], np.float32), nodes)
        state.hits = state.global_order = order_by(head, scores) + tail


@dataclass(frozen=True)
class Diffuse:
    """Rerank the top-``neighbourhood`` by diffusion (global or regional); images verified by an
    earlier stage seed it and keep their (inlier) order on top.

    ``only_after_a_match``: run only when verification found a match (re-diffusion seeded by the
    verified images after a diffuse-first verification)."""

    name: ClassVar[str] = "diffuse"
    params: DiffusionParams
    regional: bool
    neighbourhood: int
    online_graph: bool = False
    only_after_a_match: bool = False

    @property
    def needs_vectors(self) -> bool:  # type: ignore[override]
        return not self.regional

    def applies(self, state: RerankState) -> bool:
        return bool(state.hits) and (not self.only_after_a_match or state.any_verified)

    async def run(self, backend: RerankBackend, state: RerankState) -> None:
        hits = state.hits
        head, tail = hits[: self.neighbourhood], hits[self.neighbourhood :]
        is_verified = [state.is_verified(h.image_id) for h in head]
        seeds = {i: 1.0 for i, v in enumerate(is_verified) if v}
        loop = asyncio.get_running_loop()
        if self.regional:
            nodes = await backend.regional_nodes(head, state.deadline)
            if state.query.regions is None or not len(nodes):
                return
            graph = None if self.online_graph else backend.collection.regional_graph
            query_regions = state.query.regions

            def run() -> DiffusionOutcome:
                edges = None
                if graph is not None:
                    names = [region_node(head[i].image_id, j) for i, j in zip(nodes.owner.tolist(), nodes.rank_in_image().tolist())]
                    edges = graph.neighbourhood_lists(names, nodes.vectors, self.params.k)
                # the query's (k-means-reduced) regions seed it jointly: one solve
                return diffusion_rerank(query_regions, nodes.vectors, nodes.owner, len(head), self.params, seeds=seeds, edges=edges)
        else:
            q = _whitened_query(backend, state.query)
            vectors = hit_vectors(head)
            graph = None if self.online_graph else backend.collection.graph

            def run() -> DiffusionOutcome:
                edges = None if graph is None else graph.neighbourhood_lists([h.image_id for h in head], vectors, self.params.k)
                return diffusion_rerank(q, vectors, None, len(head), self.params, seeds=seeds, edges=edges)

        outcome = await loop.run_in_executor(None, run)
        backend.metrics.diffusion_iterations.observe(outcome.iterations)
        if not seeds:
            state.hits = order_by(head, outcome.scores) + tail
            return
        # verified keep their (inlier) order on top; the rest follow by diffusion score
        top = [h for h, v in zip(head, is_verified) if v]
        rest_idx = [i for i, v in enumerate(is_verified) if not v]
        state.hits = top + order_by([head[i] for i in rest_idx], outcome.scores[rest_idx]) + tail


@dataclass(frozen=True)
class Verify:
    """Geometric verification of the top-``candidates`` (local features + RANSAC): verified
    images first by inliers, then the rest in their order.

    ``global_too``: verify the union of the current top-``candidates`` and the global
    order's top-``candidates`` (rescues queries whose diffusion drifted away)."""

    name: ClassVar[str] = "verify"
    needs_vectors: ClassVar[bool] = False
    params: VerifyParams
    candidates: int
    global_too: bool = False

    def applies(self, state: RerankState) -> bool:
        return state.query.local is not None and bool(state.hits)

    async def run(self, backend: RerankBackend, state: RerankState) -> None:
        hits, n = state.hits, self.candidates
        if self.global_too:
            hits, n = union_candidates(state.hits, state.global_order, self.candidates)
        head, tail = hits[:n], hits[n:]
        ranked = await backend.verify(state.query.local, head, self.params, state.deadline)
        backend.metrics.verify_candidates.inc(sum(1 for v in ranked if v.result is not None))
        backend.metrics.verify_verified.inc(sum(1 for v in ranked if v.verified))
        state.verified = {v.hit.image_id: v for v in ranked}
        reordered = [v.hit for v in ranked] + tail
        state.hits = verified_first(reordered, state.verified, state.hits) if self.global_too else reordered


@dataclass(frozen=True)
class ExpandVerified:
    """αQE from the verified images only: the (whitened) query plus their vectors searches the
    shards again; verified images stay first (inlier order), the rest follows the new scores."""

    name: ClassVar[str] = "expand"
    needs_vectors: ClassVar[bool] = True

    def applies(self, state: RerankState) -> bool:
        return state.any_verified

    async def run(self, backend: RerankBackend, state: RerankState) -> None:
        hits = state.hits
        good = [h.vector for h in hits if state.is_verified(h.image_id) and h.vector is not None]
        if not good:
            return
        q = state.query
        q_new = _whitened_query(backend, q) + np.sum(good, axis=0)
        q_new = (q_new / max(float(np.linalg.norm(q_new)), 1e-12)).astype(np.float32)
        per_shard, missing = await backend.fanout(q_new, state.depth, state.deadline, True, transformed=True, flt=q.filter)
        state.missing.update(missing)
        new_order = [h for h in merge_topk(per_shard, state.depth) if h.image_id != q.exclude]
        state.hits = verified_first(hits, state.verified, new_order)
