"""`cluster/whitening.py`: how verified pairs are gathered and handed to FitWhitening (a fake
client stands in for the broker; the real path runs in tests/integration/test_cluster.py)."""

from __future__ import annotations

from types import SimpleNamespace

import grpc
import numpy as np
import pytest

from cluster.whitening import DEFAULT_VERIFIED_DIM, MIN_IMAGES_BY_DEFAULT, NoVerifiedPairs, after_index, verified_pairs, whiten


class FakeClient:
    """``links``: (query, result) → inliers of a verified result; every other result unverified."""

    def __init__(self, ids: list[str], links: dict[tuple[str, str], int], raw_dim: int = 1280) -> None:
        self.ids, self.links, self.raw_dim = ids, links, raw_dim
        self.searched: list[str] = []
        self.fitted: dict | None = None

    def iter_images(self, page_size: int = 0):
        return (SimpleNamespace(id=i) for i in self.ids)

    def search(self, *, image_id: str, k: int, rerank, timeout_s: float):
        self.searched.append(image_id)
        results = [SimpleNamespace(id=image_id, verified=True, stages=SimpleNamespace(inliers=999))]  # the query itself
        for i in (x for x in self.ids if x != image_id):
            n = self.links.get((image_id, i))
            results.append(SimpleNamespace(id=i, verified=n is not None, stages=SimpleNamespace(inliers=n or 0)))
        return SimpleNamespace(results=results[:k + 1])

    def stats(self):
        return SimpleNamespace(images=len(self.ids))

    def get_images(self, ids, with_vector: bool = False):
        return SimpleNamespace(images=[SimpleNamespace(vector=np.zeros(self.raw_dim, np.float32)) for _ in ids])

    def fit_whitening(self, dim: int = 0, pairs=()):
        self.fitted = {"dim": dim, "pairs": list(pairs)}
        return SimpleNamespace(dim=dim, pairs=len(self.fitted["pairs"]), sample_size=len(self.ids))


def test_each_unordered_pair_once_with_its_larger_inlier_count():
    c = FakeClient(["a", "b", "c", "d"], {("a", "b"): 20, ("b", "a"): 30, ("c", "d"): 17, ("d", "a"): 12})
    assert verified_pairs(c, candidates=3) == [("a", "b", 30), ("a", "d", 12), ("c", "d", 17)]
    assert verified_pairs(c, candidates=3, min_inliers=15) == [("a", "b", 30), ("c", "d", 17)]


def test_a_large_collection_searches_a_seeded_sample():
    ids = [f"img{i:03d}" for i in range(50)]
    c = FakeClient(ids, {})
    verified_pairs(c, max_queries=10, seed=3)
    first = list(c.searched)
    c.searched.clear()
    verified_pairs(c, max_queries=10, seed=3)
    assert len(first) == 10 and first == c.searched and set(first) <= set(ids)
    with pytest.raises(ValueError, match="candidates"):
        verified_pairs(c, candidates=0)


def test_whiten_verified_fits_the_pairs_at_the_default_dimension():
    c = FakeClient(["a", "b", "c"], {("a", "b"): 40})
    w = whiten(c, "verified")
    assert c.fitted == {"dim": DEFAULT_VERIFIED_DIM, "pairs": [("a", "b")]} and w.pairs == 1
    c2 = FakeClient(["a", "b"], {("a", "b"): 40}, raw_dim=226)
    whiten(c2, "verified")
    assert c2.fitted["dim"] == 226  # a trained head's 226-D: capped at the raw dimension
    c3 = FakeClient(["a", "b"], {("a", "b"): 40})
    whiten(c3, "verified", dim=64)
    assert c3.fitted["dim"] == 64


def test_nothing_verified_is_its_own_error_and_pca_needs_no_pairs():
    c = FakeClient(["a", "b"], {})
    with pytest.raises(NoVerifiedPairs, match="no two indexed images verify"):
        whiten(c, "verified")
    assert c.fitted is None
    whiten(c, "pca")
    assert c.fitted == {"dim": 0, "pairs": []}
    with pytest.raises(ValueError, match="method"):
        whiten(c, "zca")


def test_the_index_default_whitens_only_a_large_enough_collection():
    small = FakeClient(["a", "b", "c"], {("a", "b"): 40})
    w, why = after_index(small, None)
    assert w is None and small.fitted is None and f"at least {MIN_IMAGES_BY_DEFAULT}" in why
    assert after_index(small, "verified")[0].pairs == 1  # asked for: done at any size
    ids = [f"img{i:04d}" for i in range(MIN_IMAGES_BY_DEFAULT)]
    large = FakeClient(ids, {(ids[0], ids[1]): 40})
    w, why = after_index(large, None)
    assert w is not None and w.pairs == 1 and why == "" and large.fitted["dim"] == DEFAULT_VERIFIED_DIM
    unmatched = FakeClient(ids, {})
    w, why = after_index(unmatched, None)
    assert w is None and "no two indexed images verify" in why  # the default never fails the indexing
    with pytest.raises(NoVerifiedPairs):
        after_index(unmatched, "verified")
    assert after_index(large, "none") == (None, "")


class _Unavailable(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "broker restarting"


def test_a_failed_default_whitening_does_not_fail_the_indexing():
    ids = [f"img{i:04d}" for i in range(MIN_IMAGES_BY_DEFAULT)]
    c = FakeClient(ids, {(ids[0], ids[1]): 40})

    def fail(**_kw):
        raise _Unavailable()

    c.fit_whitening = fail  # type: ignore[method-assign]
    w, why = after_index(c, None)
    assert w is None and why.startswith("whiten: UNAVAILABLE: broker restarting")
    with pytest.raises(grpc.RpcError):
        after_index(c, "verified")  # asked for explicitly: the error is the caller's
