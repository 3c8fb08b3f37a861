"""Geometric-verification stage of the broker: verified candidates ranked by inliers.

Where the pairs are matched and fitted is the pipeline's choice (``SearchPipeline.verify``): on
the shards that hold the candidates (the ``Verify`` rpc, default) or here, after reading the
candidates' local features (``verify_locally``). Both verify each pair with
``services.rerank.verify.verify_pair`` on the same decoded features (the shard decodes them
straight from its store, ``stored_candidate``), and both rank with ``rank_verified``: the
results are the same.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

from services.broker.topk import Hit
from services.common.local_candidates import CandidateLocal, verify_local
from services.rerank.verify import VerifyParams, VerifyResult, inlier_confidence, rerank_by_inliers


@dataclass(frozen=True)
class VerifiedHit:
    """A candidate after verification (``result`` is None when it was not verified: no local
    features, or its shard did not answer)."""

    hit: Hit
    score: float
    result: VerifyResult | None
    inlier_points: np.ndarray | None  # (I, 2) x, y of the candidate's inlier keypoints, for matches
    verified: bool = False


def final_score(global_score: float, inliers: int, verified: bool) -> float:
    """Score consistent with ``rerank_by_inliers``: inliers dominate, global score breaks ties.

    Verified: ``inliers + 0.999 * (1 + g) / 2`` (≥ min_inliers ≥ 3); unverified: ``g`` (≤ 1).
    """
    return float(inliers + 0.999 * (1.0 + global_score) / 2.0) if verified else float(global_score)


Outcome = tuple[VerifyResult, np.ndarray]
"""One candidate's result and its (I, 2) inlier points."""


async def verify_locally(
    query: tuple[np.ndarray, np.ndarray], hits: Sequence[Hit], local: Mapping[str, CandidateLocal], params: VerifyParams,
    executor: Executor,
) -> dict[str, Outcome]:
    """Verify the ``hits`` that have local features here, on ``executor``'s threads (id → outcome)."""
    have = [h.image_id for h in hits if h.image_id in local]

    def one(image_id: str) -> Outcome:
        c = local[image_id]
        result = verify_local(query, c, params)
        return result, c.keypoints[result.inlier_pairs[:, 1], :2]

    loop = asyncio.get_running_loop()
    outcomes = await loop.run_in_executor(None, lambda: list(executor.map(one, have)))
    return dict(zip(have, outcomes))


def rank_verified(hits: Sequence[Hit], outcomes: Mapping[str, Outcome], params: VerifyParams) -> list[VerifiedHit]:
    """``hits`` (the top-V) in reranked order: verified first by inliers, then the rest by score."""
    inliers = np.array([outcomes[h.image_id][0].inliers if h.image_id in outcomes else 0 for h in hits])
    order = rerank_by_inliers(np.array([h.score for h in hits]), inliers, params.min_inliers)
    out = []
    for i in order:
        h = hits[int(i)]
        res, points = outcomes.get(h.image_id, (None, None))
        verified = res is not None and res.inliers >= params.min_inliers
        out.append(VerifiedHit(h, final_score(h.score, res.inliers if res else 0, verified), res, points, verified))
    return out


def confidence(result: VerifyResult | None, min_inliers: int) -> float:
    """Per-result confidence: logistic in inliers when verified, else 0."""
    if result is None or result.inliers < min_inliers:
        return 0.0
    return float(inlier_confidence(result.inliers))


def query_confidence(verified: Iterable[VerifiedHit], min_inliers: int) -> float:
    """Confidence that the query has a true match: that of its best-verified candidate."""
    return max((confidence(v.result, min_inliers) for v in verified), default=0.0)
