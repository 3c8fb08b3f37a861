"""Each rerank stage object on its own, against a fake ``RerankBackend`` (pure logic, no network),
and the order ``build_plan`` lays them out in."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from loupe.rerank_spec import parse_rerank
from services.broker.config import BrokerConfig
from services.broker.metrics import BrokerMetrics
from services.broker.query import Query
from services.broker.rerank_stages import (Diffuse, Expand, ExpandVerified, RegionalMatch, RegionalNodes, RerankState, Verify,
                                           regional_match_scores)
from services.broker.search_plan import build_plan
from services.broker.topk import Hit
from services.broker.verification import VerifiedHit, final_score
from services.common.errors import InvalidArgument
from services.rerank.diffusion import DiffusionParams
from services.rerank.verify import VerifyParams, VerifyResult


def unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def chain(n: int, d: int = 16, step: float = 0.35, seed: int = 0) -> np.ndarray:
    """Points along a curve: neighbours are similar, the ends are not."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(d, d)))[0]
    t = np.arange(n) * step
    return unit(np.cos(t)[:, None] * basis[0] + np.sin(t)[:, None] * basis[1] + 0.01 * rng.normal(size=(n, d)))


class Identity:
    graph = None
    regional_graph = None

    @staticmethod
    def transform(x):
        return np.asarray(x, np.float32)


class FakeBackend:
    """Fan-outs answer from a fixed collection; verification from a fixed inlier table."""

    def __init__(self, vectors: dict[str, np.ndarray] | None = None, inliers: dict[str, int] | None = None,
                 regions: dict[str, np.ndarray] | None = None, missing: list[int] | None = None):
        self.collection = Identity()
        self.metrics = BrokerMetrics.create()
        self.vectors = vectors or {}
        self.inliers = inliers or {}
        self.regions = regions or {}
        self.missing = missing or []
        self.fanouts: list[np.ndarray] = []
        self.verified_ids: list[list[str]] = []

    async def fanout(self, query, depth, deadline, return_vectors=False, transformed=False, flt=None):
        assert transformed and return_vectors
        self.fanouts.append(query)
        ranked = sorted(self.vectors.items(), key=lambda kv: -float(kv[1] @ query))[:depth]
        return [[Hit(float(v @ query), i, 0, vector=v) for i, v in ranked]], list(self.missing)

    async def regional_nodes(self, hits, deadline):
        return RegionalNodes.stacked([(i, self.regions[h.image_id]) for i, h in enumerate(hits) if h.image_id in self.regions])

    async def verify(self, query_local, hits, params, deadline):
        self.verified_ids.append([h.image_id for h in hits])
        out = []
        for h in hits:
            n = self.inliers.get(h.image_id, 0)
            ok = n >= params.min_inliers
            result = VerifyResult(n, np.zeros((n, 2), np.int32), np.eye(2, 3)) if ok else VerifyResult(0, np.zeros((0, 2), np.int32), None)
            out.append(VerifiedHit(h, final_score(h.score, n, ok), result, None, ok))
        return sorted(out, key=lambda v: (not v.verified, -v.result.inliers))


def state_of(hits, query: Query | None = None, depth: int = 10) -> RerankState:
    q = query or Query(np.ones(4, np.float32) / 2, local=(np.zeros((1, 4)), np.zeros((1, 8))))
    return RerankState(q, list(hits), depth, deadline=None)


def run(stage, backend, state):
    assert stage.applies(state)
    asyncio.run(stage.run(backend, state))
    return [h.image_id for h in state.hits]


# --- the plan ---------------------------------------------------------------------------------


def kinds(spec: str) -> list[str]:
    return [type(s).__name__ + ("*" if getattr(s, "only_after_a_match", False) else "") for s in build_plan(parse_rerank(spec), BrokerConfig()).stages]


def test_plan_lays_the_stages_out_in_order():
    assert kinds("none") == []
    assert kinds("verify,diffuse-regional,diffuse-first,verify-global") == ["Diffuse", "Verify"]
    assert kinds("verify,diffuse") == ["Verify", "Diffuse"]
    assert kinds("qe,verify,qe-verified,diffuse,diffuse-first,reseed") == ["Expand", "Diffuse", "Verify", "ExpandVerified", "Diffuse*"]
    assert kinds("dba,diffuse") == ["Expand", "Diffuse"]
    assert kinds("regional-match,verify,diffuse-regional,diffuse-first,verify-global") == ["RegionalMatch", "Diffuse", "Verify"]
    assert kinds("qe,regional-match,verify") == ["Expand", "RegionalMatch", "Verify"]
    plan = build_plan(parse_rerank("verify:50,diffuse-regional:300,diffuse-first,verify-global,k=30"), BrokerConfig())
    diffuse, verify = plan.stages
    assert diffuse.regional and diffuse.neighbourhood == 300 and diffuse.params.k == 30 and not diffuse.only_after_a_match
    assert verify.candidates == 50 and verify.global_too and verify.params.min_inliers == BrokerConfig().verify.min_inliers
    assert plan.depth == 300 and plan.regional and not plan.need_vectors and plan.verify is verify.params


def test_plan_needs_vectors_for_expansion_and_global_diffusion_only():
    cfg = BrokerConfig()
    assert build_plan(parse_rerank("diffuse"), cfg).need_vectors
    assert build_plan(parse_rerank("qe"), cfg).need_vectors
    assert build_plan(parse_rerank("verify,qe-verified"), cfg).need_vectors
    assert not build_plan(parse_rerank("verify"), cfg).need_vectors
    assert not build_plan(parse_rerank("diffuse-regional"), cfg).need_vectors


def test_diffuse_first_without_verification_runs_no_diffusion_but_reports_it():
    plan = build_plan(parse_rerank("diffuse-first"), BrokerConfig())
    assert plan.stages == () and plan.diffusion is not None and plan.need_vectors


def test_plan_refuses_stages_missing_their_prerequisite():
    with pytest.raises(InvalidArgument, match="rerank.verify_global_too"):
        build_plan(parse_rerank("verify,diffuse,verify-global"), BrokerConfig())
    with pytest.raises(InvalidArgument, match="rerank.expand_verified"):
        build_plan(parse_rerank("qe-verified"), BrokerConfig())


# --- Expand -----------------------------------------------------------------------------------


def test_expand_qe_searches_again_and_becomes_the_global_order():
    x = chain(12)
    vectors = {f"i{i}": v for i, v in enumerate(x)}
    backend = FakeBackend(vectors, missing=[1])
    hits = [Hit(float(x[0] @ v), i, 0, vector=v) for i, v in list(vectors.items())[:6]]
    state = state_of(hits, Query(x[0]), depth=12)
    first_scores = dict(state.global_scores)
    ids = run(Expand(qe=True, dba=False, n=3, alpha=3.0, dba_neighbourhood=100), backend, state)
    assert len(backend.fanouts) == 1 and abs(np.linalg.norm(backend.fanouts[0]) - 1) < 1e-5
    assert len(ids) == 12 and state.global_order is state.hits and state.missing == {1}
    assert all(state.global_scores[i] == s for i, s in first_scores.items())  # the first stage's scores are kept


def test_expand_dba_rescores_without_a_second_search():
    x = unit(np.random.default_rng(1).normal(size=(20, 8)))
    hits = [Hit(float(v @ x[0]), f"i{i}", vector=v) for i, v in enumerate(x)]
    backend = FakeBackend()
    run(Expand(qe=False, dba=True, n=2, alpha=3.0, dba_neighbourhood=10), backend, state := state_of(hits, Query(x[0])))
    assert backend.fanouts == [] and sorted(h.image_id for h in state.hits) == sorted(h.image_id for h in hits)
    assert [h.image_id for h in state.hits[10:]] == [h.image_id for h in hits[10:]]  # beyond the DBA neighbourhood: untouched


# --- Diffuse ----------------------------------------------------------------------------------


def test_diffuse_follows_the_manifold_within_the_neighbourhood():
    x = chain(30)
    # the global order interleaves the chain; diffusion from x[0] walks it in order
    order = [0, 5, 1, 9, 2, 3, 4, 6, 7, 8] + list(range(10, 30))
    hits = [Hit(1.0 - k / 100, f"i{i}", vector=x[i]) for k, i in enumerate(order)]
    stage = Diffuse(DiffusionParams(k=3, kq=2, gamma=1.0), regional=False, neighbourhood=10)
    ids = run(stage, FakeBackend(), state_of(hits, Query(x[0])))
    assert set(ids[:4]) == {"i0", "i1", "i2", "i3"} and ids.index("i9") == 9 and ids[10:] == [f"i{i}" for i in range(10, 30)]  # the tail keeps its place


def test_diffuse_keeps_verified_on_top_and_reseed_needs_a_match():
    x = chain(20)
    hits = [Hit(1.0 - i / 100, f"i{i}", vector=x[i]) for i in range(20)]
    reseed = Diffuse(DiffusionParams(k=3, kq=2, gamma=1.0), regional=False, neighbourhood=20, only_after_a_match=True)
    state = state_of(hits, Query(x[0]))
    assert not reseed.applies(state) and not Diffuse(reseed.params, False, 20).applies(state_of([]))
    state.verified = {"i15": VerifiedHit(hits[15], 30.0, None, None, True), "i3": VerifiedHit(hits[3], 0.5, None, None, False)}
    assert reseed.applies(state)
    state.hits = [hits[15]] + [h for h in hits if h.image_id != "i15"]
    ids = run(reseed, FakeBackend(), state)
    assert ids[0] == "i15" and sorted(ids) == sorted(h.image_id for h in hits)


def test_regional_diffuse_without_regions_leaves_the_order():
    hits = [Hit(0.9, "a"), Hit(0.8, "b")]
    stage = Diffuse(DiffusionParams(), regional=True, neighbourhood=10)
    assert run(stage, FakeBackend(), state_of(hits)) == ["a", "b"]  # the query has no regions
    q = Query(np.ones(4, np.float32), regions=unit(np.eye(2, 4)))
    assert run(stage, FakeBackend(), state_of(hits, q)) == ["a", "b"]  # the shards returned none


def test_regional_diffuse_pools_regions_per_image():
    rng = np.random.default_rng(2)
    centres = unit(rng.normal(size=(6, 16)))
    regions = {f"i{i}": unit(centres[i] + 0.05 * rng.normal(size=(3, 16))) for i in range(6)}
    hits = [Hit(1.0 - i / 10, f"i{i}") for i in range(6)]
    q = Query(np.ones(16, np.float32), regions=unit(centres[[4, 4]] + 0.01 * rng.normal(size=(2, 16))))
    ids = run(Diffuse(DiffusionParams(k=5, kq=3, aggregate="max"), regional=True, neighbourhood=6), FakeBackend(regions=regions), state_of(hits, q))
    assert ids[0] == "i4"


# --- Verify -----------------------------------------------------------------------------------


def test_verify_puts_verified_first_by_inliers_and_counts_them():
    hits = [Hit(1.0 - i / 10, f"i{i}") for i in range(6)]
    backend = FakeBackend(inliers={"i3": 40, "i1": 20, "i5": 60})
    state = state_of(hits)
    ids = run(Verify(VerifyParams(min_inliers=16), candidates=4), backend, state)
    assert backend.verified_ids == [["i0", "i1", "i2", "i3"]]  # the top-4 only
    assert ids == ["i3", "i1", "i0", "i2", "i4", "i5"]
    assert set(state.verified) == {"i0", "i1", "i2", "i3"} and state.any_verified
    reg = backend.metrics.registry
    assert reg.get_sample_value("loupe_verify_verified_total") == 2


def test_verify_global_too_verifies_the_union_of_both_shortlists():
    diffused = [Hit(1.0 - i / 10, f"d{i}") for i in range(6)]
    state = state_of(diffused)
    state.global_order = [Hit(0.9, "d5"), Hit(0.8, "d0")]
    backend = FakeBackend(inliers={"d5": 30})
    ids = run(Verify(VerifyParams(min_inliers=16), candidates=2, global_too=True), backend, state)
    assert backend.verified_ids == [["d0", "d1", "d5"]]
    assert ids == ["d5", "d0", "d1", "d2", "d3", "d4"]  # verified first, then the diffused order


def test_verify_needs_local_features_and_hits():
    stage = Verify(VerifyParams(), candidates=5)
    assert not stage.applies(state_of([Hit(1.0, "a")], Query(np.ones(4, np.float32))))
    assert not stage.applies(state_of([]))


# --- ExpandVerified ---------------------------------------------------------------------------


def test_expand_verified_searches_from_the_verified_images_keeping_them_first():
    x = chain(12)
    vectors = {f"i{i}": v for i, v in enumerate(x)}
    hits = [Hit(1.0 - i / 100, f"i{i}", vector=x[i]) for i in range(12)]
    state = state_of(hits, Query(x[0]), depth=12)
    stage = ExpandVerified()
    assert not stage.applies(state)
    state.verified = {"i7": VerifiedHit(hits[7], 30.0, None, None, True)}
    state.hits = [hits[7]] + [h for h in hits if h.image_id != "i7"]
    backend = FakeBackend(vectors)
    ids = run(stage, backend, state)
    assert len(backend.fanouts) == 1 and ids[0] == "i7" and sorted(ids) == sorted(vectors)
    expected = unit(x[0] + x[7])
    np.testing.assert_allclose(backend.fanouts[0], expected, atol=1e-6)


# --- regional matching ----------------------------------------------------------------------


def test_regional_match_scores_add_the_best_region():
    q = unit([1, 0, 0])
    regions = [(0, unit([[0, 1, 0], [1, 1, 0]])), (2, unit([[1, 0, 0]]))]  # hit 1 has no regions
    scores = regional_match_scores(q, np.array([0.5, 0.4, 0.1]), RegionalNodes.stacked(regions))
    assert scores == pytest.approx([0.5 + 2**-0.5, 0.4, 0.1 + 1.0])


def test_regional_nodes_know_each_nodes_rank_in_its_image():
    nodes = RegionalNodes.stacked([(0, np.ones((2, 3))), (1, np.ones((0, 3))), (3, np.ones((3, 3))), (4, np.ones((1, 3)))])
    assert nodes.owner.tolist() == [0, 0, 3, 3, 3, 4] and nodes.vectors.shape == (6, 3) and nodes.vectors.dtype == np.float32
    assert nodes.rank_in_image().tolist() == [0, 1, 0, 1, 2, 0]
    assert len(RegionalNodes.stacked([], dim=3)) == 0 and RegionalNodes.stacked([], dim=3).vectors.shape == (0, 3)


def test_regional_match_reorders_the_neighbourhood_and_becomes_the_global_order():
    q = unit([1, 0, 0, 0])
    hits = [Hit(0.9, "a"), Hit(0.8, "b"), Hit(0.7, "c"), Hit(0.1, "tail")]
    regions = {"a": unit([[0, 1, 0, 0]]), "b": unit([[0, 0, 1, 0]]), "c": unit([[1, 0.1, 0, 0], [0, 0, 0, 1]]),
               "tail": unit([[1, 0, 0, 0]])}
    state = state_of(hits, Query(q))
    assert run(RegionalMatch(neighbourhood=3), FakeBackend(regions=regions), state) == ["c", "a", "b", "tail"]
    assert state.global_order == state.hits
    assert state.hits[0].score == pytest.approx(0.7 + float(regions["c"][0] @ q))
    assert state.hits[-1].score == 0.1  # beyond the neighbourhood: untouched
    assert state.global_scores == {"a": 0.9, "b": 0.8, "c": 0.7, "tail": 0.1}  # reported global scores stay plain


def test_plan_of_regional_match_reaches_the_regional_neighbourhood():
    cfg = BrokerConfig()
    plan = build_plan(parse_rerank("regional-match"), cfg)
    assert plan.depth == cfg.regional_neighbourhood and plan.reranks and not plan.need_vectors and not plan.regional
