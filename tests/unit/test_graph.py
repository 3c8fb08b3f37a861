"""The collection's offline kNN graph and its restriction to a query's neighbourhood."""

from __future__ import annotations

import numpy as np

from services.rerank.diffusion import affinity_from_edges, knn_affinity
from services.rerank.graph import CollectionGraph


def _data(n: int = 300, d: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((10, d))
    x = centres[rng.integers(0, 10, n)] + 0.5 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _ids(n: int) -> list[str]:
    return [f"img{i}" for i in range(n)]


def _pattern(W) -> set[tuple[int, int]]:
    coo = W.tocoo()
    return set(zip(coo.row.tolist(), coo.col.tolist()))


def test_build_is_the_exact_knn_without_self() -> None:
    x = _data()
    g = CollectionGraph.build(_ids(len(x)), x, k=7, batch=64)
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    expect = np.argsort(-s, axis=1)[:, :7]
    assert g.k == 7 and (g.neighbours != np.arange(len(x))[:, None]).all()
    np.testing.assert_array_equal(np.sort(g.neighbours, axis=1), np.sort(expect, axis=1))
    np.testing.assert_allclose(g.sims.astype(np.float32), np.take_along_axis(s, g.neighbours.astype(np.int64), 1), atol=1e-3)


def test_whole_collection_neighbourhood_gives_the_online_graph() -> None:
    x = _data()
    ids = _ids(len(x))
    g = CollectionGraph.build(ids, x, k=10)
    perm = np.random.default_rng(1).permutation(len(x))  # neighbourhood order is the query's ranking
    W = affinity_from_edges(len(x), *g.neighbourhood_lists([ids[i] for i in perm], x[perm], k=10), gamma=3.0)
    online = knn_affinity(x[perm], 10, 3.0)
    assert _pattern(W) == _pattern(online)
    np.testing.assert_allclose(W.toarray(), online.toarray(), atol=2e-3)


def test_images_added_after_the_build_join_online() -> None:
    x = _data(n=240)
    ids = _ids(len(x))
    old = CollectionGraph.build(ids[:200], x[:200], k=8)  # the last 40 came later
    rebuilt = CollectionGraph.build(ids, x, k=8)
    hybrid_w = affinity_from_edges(len(x), *old.neighbourhood_lists(ids, x, k=8), gamma=3.0)
    rebuilt_w = affinity_from_edges(len(x), *rebuilt.neighbourhood_lists(ids, x, k=8), gamma=3.0)
    # every edge a rebuilt graph has is there, the new images included
    assert _pattern(rebuilt_w) <= _pattern(hybrid_w)
    assert any(i >= 200 or j >= 200 for i, j in _pattern(hybrid_w))
    # a forgotten (replaced) image is joined online too
    old.forget(["img3"])
    assert len(old) == 199
    assert old.rows_of(["img3", "img4", "nope"]).tolist() == [-1, 4, -1]


def test_restriction_keeps_only_edges_inside_the_neighbourhood() -> None:
    x = _data()
    ids = _ids(len(x))
    g = CollectionGraph.build(ids, x, k=10)
    part = list(range(0, 300, 3))
    src, dst, sim = g.neighbourhood_lists([ids[i] for i in part], x[part], k=5)
    assert src.max() < len(part) and dst.max() < len(part)
    for a, b in zip(src.tolist(), dst.tolist()):
        assert part[b] in g.neighbours[part[a], :5]


def test_round_trip_bytes() -> None:
    x = _data(n=50)
    g = CollectionGraph.build(_ids(50), x, k=4)
    h = CollectionGraph.from_bytes(g.to_bytes())
    assert h.ids == g.ids and h.nbytes == 50 * 4 * 6
    np.testing.assert_array_equal(h.neighbours, g.neighbours)
    np.testing.assert_array_equal(h.sims, g.sims)
