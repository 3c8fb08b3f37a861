"""Matching, RANSAC verification and inlier-based reranking on synthetic data."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from services.index.store import LocalStore
from services.rerank.verify import (
    CONFIDENCE_CENTER_INLIERS,
    VerifyParams,
    inlier_confidence,
    match_descriptors,
    rerank_by_inliers,
    verify_many,
    verify_pair,
)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _scene(
    rng: np.random.Generator,
    transform: np.ndarray,
    n: int = 1000,
    n_true: int = 200,
    dim: int = 40,
    noise_px: float = 2.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Query/candidate keypoints + descriptors; the first ``n_true`` correspond under
    ``transform`` ((2, 3) affine or (3, 3) homography), the rest are unrelated."""
    q_desc = _unit(rng.standard_normal((n, dim)))
    c_desc = _unit(rng.standard_normal((n, dim)))
    c_desc[:n_true] = _unit(q_desc[:n_true] + 0.05 * rng.standard_normal((n_true, dim)))
    q_xy = rng.uniform(0, 1024, (n, 2))
    c_xy = rng.uniform(0, 1024, (n, 2))
    h = np.vstack([transform, [0, 0, 1]]) if transform.shape == (2, 3) else transform
    p = np.c_[q_xy[:n_true], np.ones(n_true)] @ h.T
    c_xy[:n_true] = p[:, :2] / p[:, 2:] + rng.normal(0, noise_px, (n_true, 2))
    return q_xy.astype(np.float32), q_desc, c_xy.astype(np.float32), c_desc


AFFINE = np.array([[0.8, 0.15, 60.0], [-0.1, 0.9, -30.0]])
HOMOGRAPHY = np.array([[0.9, 0.05, 40.0], [-0.04, 1.1, 10.0], [1e-4, -5e-5, 1.0]])


# -- params ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("matcher", "knn"),
        ("ratio", 0.0),
        ("ratio", 1.5),
        ("model", "similarity"),
        ("estimator", "lmeds"),
        ("residual_px", 0.0),
        ("residual_px", float("nan")),
        ("max_iters", 0),
        ("confidence", 1.0),
        ("min_inliers", 2),
        ("max_scale", 0.5),
        ("max_anisotropy", 0.9),
    ],
)
def test_params_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        VerifyParams(**{field: value})


def test_homography_needs_four_inliers() -> None:
    with pytest.raises(ValueError, match="min_inliers"):
        VerifyParams(model="homography", min_inliers=3)
    assert VerifyParams(model="affine", min_inliers=3).min_inliers == 3


# -- matching -------------------------------------------------------------------------------


def test_mnn_recovers_a_noisy_permutation() -> None:
    rng = np.random.default_rng(0)
    c = _unit(rng.standard_normal((500, 40)))
    perm = rng.permutation(500)
    q = _unit(c[perm] + 0.05 * rng.standard_normal((500, 40)))
    pairs = match_descriptors(q, c)
    assert pairs.dtype == np.int32 and pairs.shape == (500, 2)
    np.testing.assert_array_equal(pairs[:, 1], perm[pairs[:, 0]])


def test_mnn_is_mutual() -> None:
    c = _unit(np.array([[1.0, 0.0], [0.0, 1.0]]))
    q = _unit(np.array([[1.0, 0.1], [1.0, 0.2]]))  # both nearest to c0; c0's nearest is q0
    np.testing.assert_array_equal(match_descriptors(q, c), [[0, 0]])


def test_ratio_test_rejects_ambiguous_and_is_one_to_one() -> None:
    c = _unit(np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.7, 0.72]]))
    q = _unit(
        np.array(
            [
                [1.0, 0.05, 0.0],  # clear match to c0
                [1.0, 0.10, 0.0],  # also clear match to c0, but less similar: dropped
                [0.0, 1.7, 0.72],  # halfway between c1 and c2: ambiguous, dropped
            ]
        )
    )
    np.testing.assert_array_equal(match_descriptors(q, c, matcher="ratio", ratio=0.8), [[0, 0]])


def test_match_handles_empty_and_rejects_bad_shapes() -> None:
    assert match_descriptors(np.zeros((0, 40)), np.ones((5, 40))).shape == (0, 2)
    assert match_descriptors(np.ones((5, 40)), np.zeros((0, 40))).shape == (0, 2)
    with pytest.raises(ValueError, match="descriptors"):
        match_descriptors(np.ones((5, 40)), np.ones((5, 32)))
    with pytest.raises(ValueError, match="matcher"):
        match_descriptors(np.ones((5, 40)), np.ones((5, 40)), matcher="knn")


# -- verification ---------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["magsac", "accurate", "ransac"])
@pytest.mark.parametrize("matcher", ["mnn", "ratio"])
def test_affine_is_recovered(matcher: str, estimator: str) -> None:
    rng = np.random.default_rng(1)
    scene = _scene(rng, AFFINE)
    result = verify_pair(*scene, VerifyParams(matcher=matcher, estimator=estimator))
    assert result.inliers >= 180
    assert result.inlier_pairs.shape == (result.inliers, 2)
    assert result.inlier_pairs.dtype == np.int32
    assert (result.inlier_pairs[:, 0] == result.inlier_pairs[:, 1]).mean() > 0.97
    assert result.model.shape == (2, 3)
    np.testing.assert_allclose(result.model[:, :2], AFFINE[:, :2], atol=0.02)
    np.testing.assert_allclose(result.model[:, 2], AFFINE[:, 2], atol=3.0)


def test_homography_is_recovered() -> None:
    rng = np.random.default_rng(2)
    scene = _scene(rng, HOMOGRAPHY)
    result = verify_pair(*scene, VerifyParams(model="homography"))
    assert result.inliers >= 180
    assert result.model.shape == (3, 3)
    corners = np.array([[0, 0, 1], [1024, 0, 1], [0, 1024, 1], [1024, 1024, 1]], float)
    est = corners @ (result.model / result.model[2, 2]).T
    true = corners @ HOMOGRAPHY.T
    np.testing.assert_allclose(est[:, :2] / est[:, 2:], true[:, :2] / true[:, 2:], atol=5.0)


def test_unrelated_descriptors_do_not_verify() -> None:
    rng = np.random.default_rng(3)
    n = 1000
    q_kp = rng.uniform(0, 1024, (n, 4)).astype(np.float32)
    c_kp = rng.uniform(0, 1024, (n, 4)).astype(np.float32)
    q_desc = _unit(rng.standard_normal((n, 40)))
    c_desc = _unit(rng.standard_normal((n, 40)))
    result = verify_pair(q_kp, q_desc, c_kp, c_desc)
    assert result.inliers < CONFIDENCE_CENTER_INLIERS
    assert inlier_confidence(result.inliers) < 0.5


def test_collapsed_model_is_rejected() -> None:
    """Matches whose candidate points all lie on one short segment fit a rank-1 "affine"
    exactly; such a model is implausible and must not count as a verification."""
    rng = np.random.default_rng(4)
    n = 60
    desc = _unit(rng.standard_normal((n, 40)))
    q_kp = rng.uniform(0, 1024, (n, 2)).astype(np.float32)
    c_kp = np.c_[q_kp[:, 0] * 0.1 + 300, np.full(n, 500.0)].astype(np.float32)
    result = verify_pair(q_kp, desc, c_kp, desc)
    assert result.inliers == 0 and result.model is None
    assert result.inlier_pairs.shape == (0, 2)


def test_mirror_image_is_rejected() -> None:
    rng = np.random.default_rng(5)
    mirror = np.array([[-1.0, 0.0, 1024.0], [0.0, 1.0, 0.0]])
    result = verify_pair(*_scene(rng, mirror))
    assert result.inliers == 0


def test_too_few_matches_is_unverified() -> None:
    rng = np.random.default_rng(6)
    desc = _unit(rng.standard_normal((3, 40)))
    kp = rng.uniform(0, 100, (3, 2)).astype(np.float32)
    result = verify_pair(kp, desc, kp, desc)
    assert result.inliers == 0 and result.model is None


def test_candidate_side_scales_the_threshold() -> None:
    """A candidate stored at 4x the size with 4x the keypoint noise verifies when its side is
    given (threshold 80 px) and loses most inliers when it is not (20 px)."""
    rng = np.random.default_rng(7)
    q_kp, q_desc, c_kp, c_desc = _scene(rng, np.array([[4.0, 0, 0], [0, 4.0, 0]]), noise_px=24.0)
    plain = verify_pair(q_kp, q_desc, c_kp, c_desc)
    scaled = verify_pair(q_kp, q_desc, c_kp, c_desc, candidate_side=4096)
    assert scaled.inliers >= 180
    assert plain.inliers < 0.8 * scaled.inliers
    with pytest.raises(ValueError, match="candidate_side"):
        verify_pair(q_kp, q_desc, c_kp, c_desc, candidate_side=0)


def test_keypoint_shape_is_checked() -> None:
    desc = np.ones((5, 40), np.float32)
    with pytest.raises(ValueError, match="q_kp"):
        verify_pair(np.ones((5, 1)), desc, np.ones((5, 2)), desc)
    with pytest.raises(ValueError, match="c_kp"):
        verify_pair(np.ones((5, 2)), desc, np.ones((4, 2)), desc)


def test_pairs_verified_on_threads_match_one_thread() -> None:
    # the broker's verify pool runs pairs on threads (matching products on BLAS, fits on OpenCV)
    rng = np.random.default_rng(8)
    q_kp, q_desc, c_kp, c_desc = _scene(rng, AFFINE)
    noise = (rng.uniform(0, 1024, (1000, 2)).astype(np.float32), _unit(rng.standard_normal((1000, 40))))
    candidates = [noise, (c_kp, c_desc), noise, (c_kp[:500], c_desc[:500])] * 2
    sequential = verify_many((q_kp, q_desc), [(kp, d, None) for kp, d in candidates])
    with ThreadPoolExecutor(max_workers=2) as pool:
        threaded = list(pool.map(lambda c: verify_pair(q_kp, q_desc, c[0], c[1]), candidates))
    counts = [r.inliers for r in sequential]
    assert counts == [r.inliers for r in threaded]
    assert all(np.array_equal(a.inlier_pairs, b.inlier_pairs) for a, b in zip(sequential, threaded))
    assert counts[1] >= 180 and counts[3] >= 90 and counts[0] < 10 and counts[2] < 10


# -- many candidates, fewer matches ----------------------------------------------------------


def test_max_matches_keeps_the_most_similar() -> None:
    rng = np.random.default_rng(25)
    q_kp, q_desc, c_kp, c_desc = _scene(rng, AFFINE)
    every = match_descriptors(q_desc, c_desc)
    top = match_descriptors(q_desc, c_desc, max_matches=50)
    assert len(top) == 50 and len(every) > 50
    sims = lambda p: (q_desc[p[:, 0]] * c_desc[p[:, 1]]).sum(axis=1)  # noqa: E731
    assert sims(top).min() >= np.sort(sims(every))[-50]  # the 50 most similar, in query order
    assert set(map(tuple, top)) <= set(map(tuple, every)) and np.all(np.diff(top[:, 0]) > 0)
    with pytest.raises(ValueError, match="max_matches"):
        VerifyParams(min_inliers=16, max_matches=10)


def test_verify_many_equals_verify_pair() -> None:
    rng = np.random.default_rng(24)
    q_kp, q_desc, c_kp, c_desc = _scene(rng, AFFINE)
    noise = (rng.uniform(0, 1024, (1000, 2)).astype(np.float32), _unit(rng.standard_normal((1000, 40))), None)
    candidates = [noise, (c_kp, c_desc, 2048.0), (c_kp[:400], c_desc[:400], 1024.0), noise]
    params = VerifyParams(min_inliers=16)
    many = verify_many((q_kp, q_desc), candidates, params)
    for got, (kp, desc, side) in zip(many, candidates):
        expected = verify_pair(q_kp, q_desc, kp, desc, params, candidate_side=side)
        assert got.inliers == expected.inliers
        np.testing.assert_array_equal(got.inlier_pairs, expected.inlier_pairs)
        np.testing.assert_array_equal(got.model if got.model is not None else [], expected.model if expected.model is not None else [])
    assert many[1].inliers >= 150 and many[0].inliers == 0
    with pytest.raises(ValueError, match="candidate_side"):
        verify_many((q_kp, q_desc), [(c_kp, c_desc, 0.0)], params)


def test_the_shard_reads_the_stored_codes_as_getfeatures_sends_them() -> None:
    from services.common.local_candidates import candidate_local
    from services.index.records import stored_to_features
    from services.index.servicer import stored_candidate
    from services.index.store import StoredImage

    rng = np.random.default_rng(26)
    kp = np.c_[rng.uniform(0, 1000, (300, 2)), np.ones((300, 2))].astype(np.float32)
    for img in (StoredImage("a", _unit(rng.standard_normal((1, 8)))[0], None, LocalStore.quantize(kp, _unit(rng.standard_normal((300, 40)))),
                            {}, 1024, 683),
                StoredImage("b", _unit(rng.standard_normal((1, 8)))[0], None, None, {}, 640, 480)):
        direct, sent = stored_candidate(img), candidate_local(stored_to_features(img, global_vec=None, regional=None, local=True))
        if img.local is None:
            assert direct is None and sent is None
            continue
        for name in ("keypoints", "descriptors"):
            np.testing.assert_array_equal(getattr(direct, name), getattr(sent, name))
            assert getattr(direct, name).dtype == np.float32
        assert direct.side == sent.side == 1024.0


# -- reranking and confidence ---------------------------------------------------------------


def test_rerank_verified_first_then_global_order() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    inliers = np.array([0, 12, 3, 40, 12, 0])
    order = rerank_by_inliers(scores, inliers, min_inliers=4)
    # verified: 3 (40), then 1 and 4 (12 each; 1 has the higher global score); then 0, 2, 5
    np.testing.assert_array_equal(order, [3, 1, 4, 0, 2, 5])
    assert order.dtype == np.int64


def test_rerank_without_verified_keeps_global_order_and_checks_shapes() -> None:
    scores = np.array([0.1, 0.5, 0.3])
    np.testing.assert_array_equal(rerank_by_inliers(scores, np.zeros(3)), [1, 2, 0])
    with pytest.raises(ValueError, match="global_scores"):
        rerank_by_inliers(scores, np.zeros(2))


def test_inlier_confidence_is_a_monotone_logistic() -> None:
    values = [inlier_confidence(n) for n in range(0, 60)]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert all(a < b for a, b in zip(values, values[1:]) if b < 1.0)
    assert inlier_confidence(CONFIDENCE_CENTER_INLIERS) == pytest.approx(0.5)
    assert inlier_confidence(0) < 0.01 and inlier_confidence(40) > 0.99
    assert inlier_confidence(10**6) == 1.0 and inlier_confidence(-(10**6)) == 0.0
    with pytest.raises(ValueError, match="width"):
        inlier_confidence(5, width=0)
