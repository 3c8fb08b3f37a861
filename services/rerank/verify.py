"""Descriptor matching and geometric verification (RANSAC family, OpenCV).

Pure functions on numpy arrays: no I/O, no thread-count or device choices. A pair
(query, candidate) is verified by matching descriptors (mutual nearest neighbours or Lowe's
ratio test on L2-normalised descriptors, one float32 matrix product; both one-to-one), then
fitting an affine transform (or a homography) query → candidate with MAGSAC++
(``cv2.USAC_MAGSAC``, by default) and counting its inliers. A model that is not a plausible
view change (mirror, zoom beyond ``max_scale``, squash beyond ``max_anisotropy``) does not
count: with dense CNN keypoints a collapsed, near rank-1 affine otherwise "explains" dozens of
chance matches between unrelated images.

Coordinates are pixels; ``VerifyParams.residual_px`` is calibrated for images whose longest
side is about 1024 px (the extractor's default working size). For candidates stored at another
size pass their longest side as ``candidate_side`` and the threshold is scaled accordingly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = [
    "REFERENCE_SIDE_PX",
    "CONFIDENCE_CENTER_INLIERS",
    "CONFIDENCE_WIDTH_INLIERS",
    "VerifyParams",
    "VerifyResult",
    "match_descriptors",
    "verify_many",
    "verify_pair",
    "fit_matches",
    "rerank_by_inliers",
    "inlier_confidence",
]

REFERENCE_SIDE_PX = 1024.0
"""Longest image side (px) at which ``VerifyParams.residual_px`` is expressed."""

_MATCHERS = ("mnn", "ratio")
_MODELS = ("affine", "homography")
_ESTIMATORS = {"magsac": cv2.USAC_MAGSAC, "accurate": cv2.USAC_ACCURATE, "ransac": cv2.RANSAC}
_MIN_POINTS = {"affine": 3, "homography": 4}


@dataclass(frozen=True)
class VerifyParams:
    """Parameters of matching + robust model fitting.

    Attributes
    ----------
    matcher : {"mnn", "ratio"}
        Mutual nearest neighbours, or nearest neighbour passing Lowe's ratio test.
    ratio : float
        Ratio-test threshold on L2 distances, in (0, 1]; used when ``matcher == "ratio"``.
    model : {"affine", "homography"}
        Geometric model fitted query → candidate.
    estimator : {"magsac", "accurate", "ransac"}
        OpenCV robust estimator: ``USAC_MAGSAC`` (MAGSAC++), ``USAC_ACCURATE`` (GC-RANSAC) or
        classic ``RANSAC``; ``bench/verify_pairs.py`` compares them.
    residual_px : float
        Inlier threshold in pixels at a 1024-px longest side.
    max_iters : int
        Maximum robust-estimation iterations.
    confidence : float
        Early-stop confidence of the robust estimator, in (0, 1).
    min_inliers : int
        A pair with fewer inliers is reported as unverified (0 inliers, no model).
    max_scale : float
        Plausibility bound on the zoom between the images: the model's local linear part
        (at the inliers' centroid) must have ``sqrt(|det|)`` in ``[1 / max_scale, max_scale]``.
    max_anisotropy : float
        Plausibility bound on the ratio of the linear part's singular values. Together with
        ``max_scale`` and "no reflection" this rejects the collapsed (near rank-1) models that
        otherwise fit chance matches of unrelated images.
    max_matches : int
        Matches handed to the robust estimator at most: the most similar ones (0 = all). The
        estimator's cost grows with the matches it scores in every iteration.
    """

    matcher: str = "mnn"
    ratio: float = 0.9
    model: str = "affine"
    estimator: str = "magsac"
    residual_px: float = 20.0
    max_iters: int = 1000
    confidence: float = 0.999
    min_inliers: int = 4
    max_scale: float = 8.0
    max_anisotropy: float = 4.0
    max_matches: int = 0

    def __post_init__(self) -> None:
        if self.matcher not in _MATCHERS:
            raise ValueError(f"matcher must be one of {_MATCHERS}, got {self.matcher!r}")
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio!r}")
        if self.model not in _MODELS:
            raise ValueError(f"model must be one of {_MODELS}, got {self.model!r}")
        if self.estimator not in _ESTIMATORS:
            raise ValueError(f"estimator must be one of {tuple(_ESTIMATORS)}, got {self.estimator!r}")
        if not (math.isfinite(self.residual_px) and self.residual_px > 0):
            raise ValueError(f"residual_px must be a positive number, got {self.residual_px!r}")
        if self.max_iters < 1:
            raise ValueError(f"max_iters must be >= 1, got {self.max_iters!r}")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence!r}")
        if self.min_inliers < _MIN_POINTS[self.model]:
            raise ValueError(
                f"min_inliers must be >= {_MIN_POINTS[self.model]} for model={self.model!r}, "
                f"got {self.min_inliers!r}"
            )
        if not self.max_scale >= 1.0:
            raise ValueError(f"max_scale must be >= 1, got {self.max_scale!r}")
        if not self.max_anisotropy >= 1.0:
            raise ValueError(f"max_anisotropy must be >= 1, got {self.max_anisotropy!r}")
        if self.max_matches != 0 and self.max_matches < self.min_inliers:
            raise ValueError(f"max_matches must be 0 (all) or >= min_inliers ({self.min_inliers}), got {self.max_matches!r}")


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of verifying one pair.

    Attributes
    ----------
    inliers : int
        Number of inlier correspondences; 0 when the pair did not verify.
    inlier_pairs : np.ndarray
        ``(I, 2)`` int32 ``[query_index, candidate_index]`` of the inlier matches.
    model : np.ndarray or None
        ``(2, 3)`` affine or ``(3, 3)`` homography mapping query xy → candidate xy (float64),
        or None when the pair did not verify.
    """

    inliers: int
    inlier_pairs: np.ndarray
    model: np.ndarray | None


_NO_PAIRS = np.zeros((0, 2), dtype=np.int32)
_UNVERIFIED = VerifyResult(0, _NO_PAIRS, None)


def match_descriptors(
    q: np.ndarray, c: np.ndarray, *, matcher: str = "mnn", ratio: float = 0.9, max_matches: int = 0
) -> np.ndarray:
    """Match L2-normalised descriptors by inner product.

    Parameters
    ----------
    q : np.ndarray
        ``(Nq, D)`` query descriptors, rows L2-normalised (any float/int dtype; cast to float32).
    c : np.ndarray
        ``(Nc, D)`` candidate descriptors, rows L2-normalised.
    matcher : {"mnn", "ratio"}
        ``"mnn"`` keeps pairs that are each other's nearest neighbour; ``"ratio"`` keeps each
        query's nearest neighbour when ``d1 < ratio * d2`` (L2 distances to the two nearest).
    ratio : float
        Ratio-test threshold.
    max_matches : int
        Keep only the ``max_matches`` most similar matches (0 = all).

    Returns
    -------
    np.ndarray
        ``(M, 2)`` int32 ``[query_index, candidate_index]``, sorted by query index.
    """
    if matcher not in _MATCHERS:
        raise ValueError(f"matcher must be one of {_MATCHERS}, got {matcher!r}")
    q = np.ascontiguousarray(q, dtype=np.float32)
    c = np.ascontiguousarray(c, dtype=np.float32)
    if q.ndim != 2 or c.ndim != 2 or q.shape[1] != c.shape[1]:
        raise ValueError(f"descriptors must be (Nq, D) and (Nc, D), got {q.shape} and {c.shape}")
    if len(q) == 0 or len(c) == 0:
        return _NO_PAIRS
    # numpy's BLAS (sized by the host process: services.common.threads); 0.2-0.3 ms a pair
    # cheaper than cv2.gemm with the same matches on 627 real ROxford pairs (BENCHMARKS.md)
    sim = q @ c.T
    rows = np.arange(len(q))
    nn = sim.argmax(axis=1)
    best = sim[rows, nn]
    if matcher == "mnn":
        # mutual iff q's best is also the best in nn's column (column max is cheap, argmax not)
        keep = best >= sim.max(axis=0)[nn]
    else:
        if len(c) < 2:
            return _NO_PAIRS
        sim[rows, nn] = -np.inf
        second = sim.max(axis=1)
        # ||a - b||^2 = 2 - 2 a.b for unit vectors
        d1 = np.sqrt(np.maximum(2.0 - 2.0 * best, 0.0))
        d2 = np.sqrt(np.maximum(2.0 - 2.0 * second, 0.0))
        keep = d1 < ratio * d2
        # one-to-one: of the queries sharing a candidate keep the most similar one (many-to-one
        # matches let a collapsed, rank-1 "affine" map a whole cluster onto one point)
        cand = np.flatnonzero(keep)
        cand = cand[np.argsort(-best[cand], kind="stable")]
        _, first = np.unique(nn[cand], return_index=True)
        keep = np.zeros(len(q), dtype=bool)
        keep[cand[first]] = True
    kept = rows[keep]
    if 0 < max_matches < len(kept):  # the most similar, ties by query index; back in query order
        kept = np.sort(kept[np.argsort(-best[kept], kind="stable")[:max_matches]])
    return np.stack([kept, nn[kept]], axis=1).astype(np.int32)


def _fit(
    src: np.ndarray, dst: np.ndarray, params: VerifyParams, threshold: float
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Robustly fit ``params.model`` src → dst; returns (model, inlier mask (M,) bool)."""
    if params.model == "affine":
        model, mask = cv2.estimateAffine2D(
            src,
            dst,
            method=_ESTIMATORS[params.estimator],
            ransacReprojThreshold=threshold,
            maxIters=params.max_iters,
            confidence=params.confidence,
        )
    else:
        model, mask = cv2.findHomography(
            src,
            dst,
            method=_ESTIMATORS[params.estimator],
            ransacReprojThreshold=threshold,
            maxIters=params.max_iters,
            confidence=params.confidence,
        )
    if model is None or mask is None or model.size == 0:
        return None, None
    return model, mask.ravel().astype(bool)


def _plausible(model: np.ndarray, at: np.ndarray, params: VerifyParams) -> bool:
    """Whether the model's Jacobian at point ``at`` (2,) is an orientation-preserving map with
    bounded zoom and anisotropy."""
    if model.shape == (2, 3):
        jac = model[:, :2]
    else:
        w = model[2, 0] * at[0] + model[2, 1] * at[1] + model[2, 2]
        if abs(w) < 1e-12:
            return False
        mapped = (model[:2, :2] @ at + model[:2, 2]) / w
        jac = (model[:2, :2] - np.outer(mapped, model[2, :2])) / w
    det = float(np.linalg.det(jac))
    if not det > 0:
        return False
    s_max, s_min = np.linalg.svd(jac, compute_uv=False)
    zoom = math.sqrt(det)
    return (
        1.0 / params.max_scale <= zoom <= params.max_scale
        and s_max <= params.max_anisotropy * s_min
    )


def verify_pair(
    q_kp: np.ndarray,
    q_desc: np.ndarray,
    c_kp: np.ndarray,
    c_desc: np.ndarray,
    params: VerifyParams = VerifyParams(),
    *,
    candidate_side: float | None = None,
) -> VerifyResult:
    """Match descriptors and fit a geometric model; count inliers.

    Parameters
    ----------
    q_kp : np.ndarray
        ``(Nq, K>=2)`` query keypoints; columns 0, 1 are x, y in pixels (extra columns ignored).
    q_desc : np.ndarray
        ``(Nq, D)`` query descriptors, rows L2-normalised.
    c_kp : np.ndarray
        ``(Nc, K>=2)`` candidate keypoints.
    c_desc : np.ndarray
        ``(Nc, D)`` candidate descriptors, rows L2-normalised.
    params : VerifyParams
        Matching and estimation parameters.
    candidate_side : float, optional
        Longest side (px) of the candidate image in the units of ``c_kp``; the residual
        threshold becomes ``residual_px * candidate_side / 1024``. None: use ``residual_px``.

    Returns
    -------
    VerifyResult
        Inlier count, ``(I, 2)`` inlier index pairs and the model; 0 inliers and no model when
        fewer than ``params.min_inliers`` inliers were found or the model is implausible.
    """
    q_kp = _checked_keypoints(q_kp, q_desc, "q_kp")
    c_kp = _checked_keypoints(c_kp, c_desc, "c_kp")
    _check_side(candidate_side)
    pairs = match_descriptors(q_desc, c_desc, matcher=params.matcher, ratio=params.ratio, max_matches=params.max_matches)
    return fit_matches(q_kp, c_kp, pairs, params, candidate_side)


def _checked_keypoints(kp: np.ndarray, desc: np.ndarray, name: str) -> np.ndarray:
    kp = np.asarray(kp)
    if kp.ndim != 2 or kp.shape[1] < 2 or len(kp) != len(desc):
        raise ValueError(f"{name} must be (N, >=2) matching its descriptors' rows, got {kp.shape}")
    return kp


def _check_side(side: float | None) -> None:
    if side is not None and not side > 0:
        raise ValueError(f"candidate_side must be positive, got {side!r}")


def fit_matches(
    q_kp: np.ndarray, c_kp: np.ndarray, pairs: np.ndarray, params: VerifyParams, candidate_side: float | None = None
) -> VerifyResult:
    """Fit ``params.model`` to matched keypoints and count its inliers (see :func:`verify_pair`).

    A pair with fewer matches than ``params.min_inliers`` cannot reach the threshold and is
    rejected before any fitting.
    """
    if len(pairs) < params.min_inliers:
        return _UNVERIFIED
    src = np.ascontiguousarray(q_kp[pairs[:, 0], :2], dtype=np.float32)
    dst = np.ascontiguousarray(c_kp[pairs[:, 1], :2], dtype=np.float32)
    threshold = params.residual_px
    if candidate_side is not None:
        threshold *= candidate_side / REFERENCE_SIDE_PX
    model, mask = _fit(src, dst, params, threshold)
    if model is None or int(mask.sum()) < params.min_inliers:
        return _UNVERIFIED
    if not _plausible(model, src[mask].mean(axis=0).astype(np.float64), params):
        return _UNVERIFIED
    inlier_pairs = pairs[mask]
    return VerifyResult(len(inlier_pairs), inlier_pairs, model)


def verify_many(
    query: tuple[np.ndarray, np.ndarray],
    candidates: Sequence[tuple[np.ndarray, np.ndarray, float | None]],
    params: VerifyParams = VerifyParams(),
) -> list[VerifyResult]:
    """Verify one query against many candidates in the calling thread, one pair at a time (the
    query cast once): the results of :func:`verify_pair` on each pair.

    One matrix product for many candidates was measured and not adopted: the (Nq, sum Nc)
    similarities leave the cache and cost more per pair than one product per pair, and a product
    of another shape may round differently, which would change matches (BENCHMARKS.md).

    Parameters
    ----------
    query : (np.ndarray, np.ndarray)
        ``(keypoints (Nq, >=2), descriptors (Nq, D))``.
    candidates : sequence of (np.ndarray, np.ndarray, float or None)
        Per candidate ``(keypoints (Nc, >=2), descriptors (Nc, D), longest side or None)``.
    params : VerifyParams

    Returns
    -------
    list of VerifyResult
        One per candidate, in input order.
    """
    q_kp = _checked_keypoints(query[0], query[1], "q_kp")
    q_desc = np.ascontiguousarray(query[1], dtype=np.float32)
    out = []
    for c_kp, c_desc, side in candidates:
        c_kp = _checked_keypoints(c_kp, c_desc, "c_kp")
        _check_side(side)
        pairs = match_descriptors(q_desc, c_desc, matcher=params.matcher, ratio=params.ratio, max_matches=params.max_matches)
        out.append(fit_matches(q_kp, c_kp, pairs, params, side))
    return out


def rerank_by_inliers(
    global_scores: np.ndarray, inliers: np.ndarray, min_inliers: int = 4
) -> np.ndarray:
    """Order candidates: verified first by inlier count, then the rest by global score.

    Parameters
    ----------
    global_scores : np.ndarray
        ``(N,)`` global similarity of each candidate (larger is better).
    inliers : np.ndarray
        ``(N,)`` inlier count of each candidate.
    min_inliers : int
        A candidate is verified when ``inliers >= min_inliers``.

    Returns
    -------
    np.ndarray
        ``(N,)`` int64 permutation: verified candidates by decreasing inliers (ties by
        decreasing global score), then unverified ones by decreasing global score (ties keep
        input order).
    """
    scores = np.asarray(global_scores, dtype=np.float64)
    counts = np.asarray(inliers, dtype=np.int64)
    if scores.shape != counts.shape or scores.ndim != 1:
        raise ValueError(f"global_scores and inliers must be equal (N,), got {scores.shape} "
                         f"and {counts.shape}")
    verified = counts >= min_inliers
    primary = np.where(verified, counts, -1)
    # lexsort: last key is primary; stable, so equal keys keep input order
    return np.lexsort((-scores, -primary)).astype(np.int64)


CONFIDENCE_CENTER_INLIERS = 24.0
"""Inlier count at which ``inlier_confidence`` is 0.5 (the no-match rejection threshold).

Measured with the served local features on the ROxford cluster (bench/no_match.py): photos with
no true match in the collection reached at most 22 inliers (4 of 26 above the previous center,
15), correct top results of the ROxford queries at least 27."""
CONFIDENCE_WIDTH_INLIERS = 2.0
"""Logistic scale (inliers) of ``inlier_confidence``."""


def inlier_confidence(
    inliers: int,
    center: float = CONFIDENCE_CENTER_INLIERS,
    width: float = CONFIDENCE_WIDTH_INLIERS,
) -> float:
    """Map an inlier count to a match confidence in [0, 1].

    ``1 / (1 + exp(-(inliers - center) / width))``. With the defaults (center 15, width 2) a
    pair with >= 15 inliers is accepted (confidence >= 0.5); 10 inliers give 0.08 and 20 give
    0.92. The center sits just above what unrelated pairs reach by chance with the default
    local features and ``VerifyParams``: at most 14 (99th percentile 9) over ~800 ROxford
    query/distractor pairs, at most ~12 over the 60 cross-landmark phototourism pairs
    (``tests/integration/test_verify_phototourism.py``).

    Parameters
    ----------
    inliers : int
        Inlier count (>= 0).
    center : float
        Count with confidence 0.5.
    width : float
        Positive logistic scale.

    Returns
    -------
    float
        Confidence in [0, 1].
    """
    if width <= 0:
        raise ValueError(f"width must be positive, got {width!r}")
    z = (float(inliers) - center) / width
    if z < -700:  # exp overflow guard
        return 0.0
    return 1.0 / (1.0 + math.exp(-z))
