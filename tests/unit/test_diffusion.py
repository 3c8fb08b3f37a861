"""Tests for services.rerank.diffusion."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from services.rerank.diffusion import (
    DiffusionParams,
    aggregate_scores,
    diffuse,
    diffusion_rerank,
    knn_affinity,
    normalise_symmetric,
    query_seed,
    self_knn,
)


def _unit(rows) -> np.ndarray:
    x = np.asarray(rows, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _circle(angles) -> np.ndarray:
    a = np.asarray(angles, dtype=np.float64)
    return np.stack([np.cos(a), np.sin(a)], axis=1).astype(np.float32)


def _two_arcs(rng, n=80, gap=0.4, noise=0.002, dim=64):
    """Two parallel quarter-circle arcs (1-D manifolds) in 3-D, ``gap`` apart along the third
    axis, rotated into ``dim`` dimensions, noised and L2-normalised. The query is the start
    of arc A. Rows ``[0, n)`` are A (in arc order), ``[n, 2n)`` are B."""
    t = np.linspace(0.0, np.pi / 2, n)
    arc_a = np.stack([np.cos(t), np.sin(t), np.zeros(n)], axis=1)
    arc_b = np.stack([np.cos(t), np.sin(t), np.full(n, gap)], axis=1)
    basis, _ = np.linalg.qr(rng.normal(size=(dim, 3)))
    X = np.concatenate([arc_a, arc_b]) @ basis.T + noise * rng.normal(size=(2 * n, dim))
    return _unit(X), _unit(arc_a[0] @ basis.T)


# ------------------------------------------------------------------------------- params


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("k", 0),
        ("kq", -1),
        ("max_iter", 0),
        ("alpha", 1.0),
        ("alpha", 0.0),
        ("gamma", 0.0),
        ("tol", 0.0),
        ("aggregate", "mean"),
        ("k", 2.5),
    ],
)
def test_params_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"DiffusionParams.{field}"):
        DiffusionParams(**{field: value})


def test_params_defaults_are_the_paper_global_setting():
    p = DiffusionParams()
    assert (p.k, p.kq, p.alpha, p.gamma, p.max_iter, p.tol) == (50, 10, 0.99, 3.0, 20, 1e-6)


# ------------------------------------------------------------------------------ the graph


def test_self_knn_excludes_self():
    X = _circle([0.0, 0.1, 0.3, 1.0])
    sims, ids = self_knn(X, 2)
    np.testing.assert_array_equal(ids, [[1, 2], [0, 2], [1, 0], [2, 1]])
    np.testing.assert_allclose(sims[0], np.cos([0.1, 0.3]), rtol=1e-6)
    assert self_knn(X, 10)[1].shape == (4, 3)  # clipped to N - 1


def test_knn_affinity_mutual_and_union_by_hand():
    # Angles 0, 0.1, 0.3, 1.0 rad; 1-NN: 0->1, 1->0, 2->1, 3->2.
    X = _circle([0.0, 0.1, 0.3, 1.0])
    W = knn_affinity(X, k=1, gamma=3.0)
    assert sorted(zip(*W.nonzero(), strict=True)) == [(0, 1), (1, 0)]  # only 0<->1 is mutual
    assert W[0, 1] == pytest.approx(np.cos(0.1) ** 3, rel=1e-6)
    U = knn_affinity(X, k=1, gamma=3.0, mutual=False)
    edges = sorted(zip(*U.nonzero(), strict=True))
    assert edges == [(0, 1), (1, 0), (1, 2), (2, 1), (2, 3), (3, 2)]
    assert U[2, 3] == pytest.approx(np.cos(0.7) ** 3, rel=1e-6)


def test_knn_affinity_is_symmetric_nonnegative_zero_diagonal():
    rng = np.random.default_rng(0)
    X = _unit(rng.normal(size=(200, 16)))
    for mutual in (True, False):
        W = knn_affinity(X, k=10, gamma=3.0, mutual=mutual)
        assert isinstance(W, sp.csr_matrix) and W.dtype == np.float32
        assert abs(W - W.T).max() == 0.0
        assert W.diagonal().max() == 0.0
        assert W.data.min() > 0.0
        assert np.diff(W.indptr).max() <= (10 if mutual else 200)


def test_negative_similarities_are_clipped():
    X = _unit([[1.0, 0.0], [-1.0, 0.0]])  # each is the other's only neighbour, s = -1
    assert knn_affinity(X, k=1, gamma=3.0).nnz == 0


def test_normalise_symmetric_by_hand_with_isolated_node():
    W = sp.csr_matrix(np.array([[0, 2, 0], [2, 0, 0], [0, 0, 0]], dtype=np.float32))
    S = normalise_symmetric(W).toarray()
    # degrees 2, 2, 0: S_01 = 2 / sqrt(2 * 2) = 1; the isolated node keeps a zero row.
    np.testing.assert_allclose(S, [[0, 1, 0], [1, 0, 0], [0, 0, 0]])
    with pytest.raises(ValueError, match="square"):
        normalise_symmetric(sp.csr_matrix(np.ones((2, 3))))


# -------------------------------------------------------------------------------- solving


def test_cg_matches_dense_solve():
    rng = np.random.default_rng(1)
    X = _unit(rng.normal(size=(60, 8)))
    S = normalise_symmetric(knn_affinity(X, k=8, gamma=3.0)).astype(np.float64)
    y = np.zeros(60)
    y[:5] = rng.uniform(0.2, 1.0, size=5)
    f, n_iter = diffuse(S, y, alpha=0.99, max_iter=1000, tol=1e-12)
    expected = np.linalg.solve(np.eye(60) - 0.99 * S.toarray(), y)
    np.testing.assert_allclose(f, expected, rtol=1e-4, atol=1e-10)
    assert 0 < n_iter <= 1000


def test_cg_counts_iterations_and_stops_at_the_cap():
    rng = np.random.default_rng(2)
    X = _unit(rng.normal(size=(300, 8)))
    S = normalise_symmetric(knn_affinity(X, k=10, gamma=3.0))
    y = np.zeros(300, dtype=np.float32)
    y[0] = 1.0
    f, n_iter = diffuse(S, y, alpha=0.99, max_iter=3, tol=1e-6)
    assert n_iter == 3 and f.dtype == np.float32
    f, n_iter = diffuse(S, np.zeros(300, np.float32), alpha=0.99, max_iter=20, tol=1e-6)
    assert n_iter == 0 and not f.any()


def test_query_seed_sums_query_vectors_then_powers():
    nodes = _unit([[1, 0], [0, 1], [1, 1]])
    # Two query vectors e1, e2, each sees all 3 nodes: sums 1, 1, 2/sqrt(2); gamma 2.
    y = query_seed(_unit([[1, 0], [0, 1]]), nodes, kq=3, gamma=2.0)
    np.testing.assert_allclose(y, [1.0, 1.0, 2.0], rtol=1e-6)
    # One query vector, kq = 1: only its nearest node is seeded.
    y = query_seed(_unit([[1, 0.1]]), nodes, kq=1, gamma=3.0)
    assert np.count_nonzero(y) == 1 and y[0] > 0
    # kq = 1 per query vector: e1 -> node 0 (s = 1), (0.28, 0.96) -> node 1 (s = 0.96);
    # only the larger sum survives: y = [1, 0, 0].
    y = query_seed(np.array([[1, 0], [0.28, 0.96]], np.float32), nodes, kq=1, gamma=3.0)
    np.testing.assert_allclose(y, [1.0, 0.0, 0.0], rtol=1e-6)
    with pytest.raises(ValueError, match="dimension"):
        query_seed(np.ones((1, 3), np.float32), nodes, kq=1, gamma=3.0)


# ---------------------------------------------------------------------- end to end, rerank


def test_diffusion_follows_the_manifold_where_cosine_does_not():
    n = 80
    X, q = _two_arcs(np.random.default_rng(3), n=n)
    far_a, arc_b = np.arange(n - 10, n), np.arange(n, 2 * n)

    cosine = X @ q
    # Plain cosine: B's start is much closer to the query than A's far end.
    assert cosine[far_a].max() < 0.3 < 0.85 < np.sort(cosine[arc_b])[-10]

    scores = diffusion_rerank(q, X, None, 2 * n, DiffusionParams(k=15, kq=5)).scores
    # Diffusion: every point of A, its far end included, above every point of B.
    assert scores[far_a].min() > 0.0
    assert scores[:n].min() > scores[arc_b].max()


def test_regional_diffusion_pools_regions_into_images():
    rng = np.random.default_rng(4)
    n_images, regions_per_image, dim = 30, 5, 32
    centres = _unit(rng.normal(size=(n_images, dim)))
    n_nodes = n_images * regions_per_image
    nodes = _unit(np.repeat(centres, regions_per_image, 0) + 0.05 * rng.normal(size=(n_nodes, dim)))
    owner = np.repeat(np.arange(n_images), regions_per_image)
    query_regions = _unit(centres[[7, 7, 7]] + 0.05 * rng.normal(size=(3, dim)))
    p = DiffusionParams(k=10, kq=10)
    S = normalise_symmetric(knn_affinity(nodes, p.k, p.gamma))
    f, _ = diffuse(S, query_seed(query_regions, nodes, p.kq, p.gamma), p.alpha, p.max_iter, p.tol)
    for how in ("sum", "max"):
        params = DiffusionParams(k=10, kq=10, aggregate=how)
        out = diffusion_rerank(query_regions, nodes, owner, n_images, params)
        assert out.scores.shape == (n_images,) and out.nodes == n_nodes and out.iterations >= 1
        assert int(np.argmax(out.scores)) == 7 and out.scores.max() == 1.0
        pooled = np.array([getattr(f[owner == i], how)() for i in range(n_images)])
        np.testing.assert_allclose(out.scores, pooled / pooled.max(), rtol=1e-5)


def test_aggregate_scores_by_hand():
    f = np.array([0.1, 0.5, 0.2, 0.3, 0.05, 0.4], dtype=np.float32)
    owner = np.array([0, 0, 1, 2, 2, 2])
    np.testing.assert_allclose(aggregate_scores(f, owner, 4, "sum"), [0.6, 0.2, 0.75, 0.0])
    np.testing.assert_allclose(aggregate_scores(f, owner, 4, "max"), [0.5, 0.2, 0.4, 0.0])
    np.testing.assert_array_equal(aggregate_scores(f, None, 6), f)
    with pytest.raises(ValueError, match="outside"):
        aggregate_scores(f, owner, 2)
    with pytest.raises(ValueError, match="one node per image"):
        aggregate_scores(f, None, 5)


def test_offline_edges_give_the_same_scores_as_the_graph_built_here():
    rng = np.random.default_rng(5)
    X = _unit(rng.normal(size=(100, 16)))
    q = X[0]
    params = DiffusionParams(k=10)
    sims, ids = self_knn(X, params.k)
    edges = (np.repeat(np.arange(100), ids.shape[1]), ids.ravel(), sims.ravel())
    np.testing.assert_array_equal(
        diffusion_rerank(q, X, None, 100, params).scores,
        diffusion_rerank(q, X, None, 100, params, edges=edges).scores,
    )


def test_seeded_images_lift_their_manifold():
    angles = np.linspace(0, 3, 30)
    X = _circle(angles)
    params = DiffusionParams(k=3, kq=2, alpha=0.99, gamma=1.0)
    plain = diffusion_rerank(X[0], X, None, len(X), params)
    seeded = diffusion_rerank(X[0], X, None, len(X), params, seeds={29: 1.0})
    assert seeded.scores[28] > plain.scores[28]
    assert plain.scores.max() == 1.0 and plain.iterations >= 1


def test_rerank_input_validation():
    X = _unit(np.eye(4, 8) + 0.1)
    with pytest.raises(ValueError, match="dimension"):
        diffusion_rerank(np.ones(7, np.float32), X, None, 4)
    with pytest.raises(ValueError, match="non-finite"):
        diffusion_rerank(np.full(8, np.nan, np.float32), X, None, 4)
    with pytest.raises(ValueError, match="n_images"):
        diffusion_rerank(X[0], X, None, 0)
    with pytest.raises(ValueError, match="outside"):
        diffusion_rerank(X[0], X, np.array([0, 1, 2, 5]), 4)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_node_is_refused_even_where_the_query_is_zero(bad):
    # the nodes are checked through the seed's product, not a scan of every node: a bad value in
    # a dimension the query does not use must still be found (inf * 0 is nan)
    X = _unit(np.eye(4, 8) + 0.1)
    q = np.zeros(8, np.float32)
    q[0] = 1.0
    X[2, 7] = bad
    with pytest.raises(ValueError, match="nodes holds non-finite"):
        diffusion_rerank(q, X, None, 4)
    with pytest.raises(ValueError, match="nodes holds non-finite"):
        diffusion_rerank(q, X, None, 4, edges=(np.array([0, 1]), np.array([1, 0]), np.array([0.5, 0.5], np.float32)))


@pytest.mark.parametrize("mutual", [True, False])
def test_affinity_by_sparse_operations_equals_the_key_sort(mutual: bool) -> None:
    """The fast path gives the very arrays of the sort it replaces, so W, the diffusion and the
    ranking are bitwise the same; a directed edge listed twice goes the old way."""
    from services.rerank import diffusion as d

    rng = np.random.default_rng(7)
    n, k = 600, 12
    src = np.repeat(np.arange(n), k)
    dst = np.concatenate([rng.choice(np.delete(np.arange(n), i), k, replace=False) for i in range(n)])
    back = rng.random(len(src)) < 0.5  # half the edges are listed both ways
    src, dst = np.concatenate([src, dst[back]]), np.concatenate([dst, src[back]])
    _, unique = np.unique(src * n + dst, return_index=True)
    src, dst = src[np.sort(unique)], dst[np.sort(unique)]
    w = rng.random(len(src)).astype(np.float32)
    fast, slow = d._undirected_by_sparse(n, src, dst, w, mutual), d._undirected_by_sort(n, src, dst, w, mutual)
    for a, b in zip(fast, slow):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    assert len(fast[0]) > 100
    assert d._undirected_by_sparse(n, np.r_[src, src[:1]], np.r_[dst, dst[:1]], np.r_[w, w[:1]], mutual) is None
