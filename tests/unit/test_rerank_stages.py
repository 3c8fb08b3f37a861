import numpy as np

from services.broker.rerank_stages import dba_rescore, expand_query, order_by
from services.broker.topk import Hit
from services.broker.verification import final_score


def unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def chain(n: int, d: int = 16, step: float = 0.35, seed: int = 0) -> np.ndarray:
    """Points along a curve: neighbours are similar, the ends are not."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(d, d)))[0]
    t = np.arange(n) * step
    pts = np.cos(t)[:, None] * basis[0] + np.sin(t)[:, None] * basis[1] + 0.01 * rng.normal(size=(n, d))
    return unit(pts)


def test_order_by_sorts_and_replaces_scores():
    hits = [Hit(0.1, "a"), Hit(0.2, "b"), Hit(0.3, "c")]
    out = order_by(hits, np.array([0.5, 0.9, 0.1]))
    assert [h.image_id for h in out] == ["b", "a", "c"] and out[0].score == 0.9


def test_dba_rescore_keeps_sorted_scores():
    x = unit(np.random.default_rng(1).normal(size=(20, 8)))
    q = x[0]
    hits = [Hit(float(v @ q), f"i{i}", vector=v) for i, v in enumerate(x)]
    out = dba_rescore(q, hits, k=2, alpha=3.0)
    assert sorted(h.image_id for h in out) == sorted(h.image_id for h in hits)
    scores = [h.score for h in out]
    assert scores == sorted(scores, reverse=True)


def test_expand_query_is_unit_norm_and_moves_towards_results():
    q = unit([1.0, 0.0, 0.0])
    hits = [Hit(0.9, "a", vector=unit([0.9, 0.43, 0.0]))]
    e = expand_query(q, hits, n=1, alpha=3.0)
    assert abs(np.linalg.norm(e) - 1) < 1e-5 and e[1] > 0


def test_final_score_orders_verified_above_unverified():
    assert final_score(-1.0, 4, True) > final_score(1.0, 0, False)
    assert final_score(0.2, 11, True) > final_score(0.9, 10, True)
    assert final_score(0.9, 10, True) > final_score(0.2, 10, True)


def test_union_candidates_and_verified_first():
    from types import SimpleNamespace

    from services.broker.rerank_stages import union_candidates, verified_first
    from services.broker.topk import Hit

    diffused = [Hit(1.0 - i / 10, f"d{i}") for i in range(6)]  # d0..d5
    global_order = [Hit(0.9, "d4"), Hit(0.8, "d0"), Hit(0.7, "d5")]
    hits, m = union_candidates(diffused, global_order, 2)
    assert [h.image_id for h in hits[:m]] == ["d0", "d1", "d4"] and m == 3  # diffused top-2, then the global top-2 not in it
    assert [h.image_id for h in hits] == ["d0", "d1", "d4", "d2", "d3", "d5"]
    assert hits[2] is diffused[4]  # the diffused Hit object (its diffusion score) is kept
    verified = {"d4": SimpleNamespace(verified=True), "d1": SimpleNamespace(verified=False)}
    ranked = [diffused[4], diffused[0], diffused[1]]
    assert [h.image_id for h in verified_first(ranked, verified, diffused)] == ["d4", "d0", "d1", "d2", "d3", "d5"]
