"""Geometric-verification stage of the broker: read candidates' local features, match, RANSAC, reorder."""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

from loupe.tensors import from_tensor
from loupe.v1 import types_pb2
from services.broker.topk import Hit
from services.rerank.verify import (
    REFERENCE_SIDE_PX,
    VerifyParams,
    VerifyResult,
    inlier_confidence,
    rerank_by_inliers,
    verify_candidates,
)

@dataclass(frozen=True)
class VerifiedHit:
    """A candidate after verification (``result`` is None when it was not verified)."""

    hit: Hit
    score: float
    result: VerifyResult | None
    candidate_points: np.ndarray | None  # (Nc, 2) keypoint xy of the candidate, for matches
    verified: bool = False


def final_score(global_score: float, inliers: int, verified: bool) -> float:
    """Score consistent with ``rerank_by_inliers``: inliers dominate, global score breaks ties.

    Verified: ``inliers + 0.999 * (1 + g) / 2`` (≥ min_inliers ≥ 3); unverified: ``g`` (≤ 1).
    """
    return float(inliers + 0.999 * (1.0 + global_score) / 2.0) if verified else float(global_score)


@dataclass(frozen=True)
class CandidateLocal:
    """Stored local features of one candidate and the longest side of its image (pixels)."""

    keypoints: np.ndarray  # (N, 4)
    descriptors: np.ndarray  # (N, 40)
    side: float


def candidate_locals(features: Mapping[str, types_pb2.ImageFeatures]) -> dict[str, CandidateLocal]:
    """Stored local features of the candidates that have any (id → CandidateLocal)."""
    return {
        image_id: CandidateLocal(
            from_tensor(f.local.keypoints, field="keypoints"),
            from_tensor(f.local.descriptors, field="descriptors"),
            float(max(f.width, f.height)) or REFERENCE_SIDE_PX,
        )
        for image_id, f in features.items()
        if f.local.keypoints.shape
    }


async def verify_hits(
    query: tuple[np.ndarray, np.ndarray],
    hits: Sequence[Hit],
    local: dict[str, CandidateLocal],
    params: VerifyParams,
    executor: Executor,
) -> list[VerifiedHit]:
    """Verify ``hits`` (the top-V) against the query and return them in reranked order."""
    have = [h for h in hits if h.image_id in local]
    loop = asyncio.get_running_loop()
    cands = [local[h.image_id] for h in have]
    results = await loop.run_in_executor(
        None,
        lambda: verify_candidates(
            query, [(c.keypoints, c.descriptors) for c in cands], params, executor, candidate_sides=[c.side for c in cands]
        ),
    )
    by_id = dict(zip((h.image_id for h in have), results))
    inliers = np.array([by_id[h.image_id].inliers if h.image_id in by_id else 0 for h in hits])
    order = rerank_by_inliers(np.array([h.score for h in hits]), inliers, params.min_inliers)
    out = []
    for i in order:
        h = hits[int(i)]
        res = by_id.get(h.image_id)
        verified = res is not None and res.inliers >= params.min_inliers
        pts = local[h.image_id].keypoints[:, :2] if h.image_id in local else None
        out.append(VerifiedHit(h, final_score(h.score, res.inliers if res else 0, verified), res, pts, verified))
    return out


def confidence(result: VerifyResult | None, min_inliers: int) -> float:
    """Per-result confidence: logistic in inliers when verified, else 0."""
    if result is None or result.inliers < min_inliers:
        return 0.0
    return float(inlier_confidence(result.inliers))


def query_confidence(verified: Iterable[VerifiedHit], min_inliers: int) -> float:
    """Confidence that the query has a true match: that of its best-verified candidate."""
    return max((confidence(v.result, min_inliers) for v in verified), default=0.0)
