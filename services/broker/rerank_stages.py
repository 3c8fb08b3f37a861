"""Vector-space rerank stages of the broker: αQE, DBA and diffusion over the neighbourhood.

Pure functions on the merged hits (each carrying its indexed vector): no gRPC here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from services.broker.topk import Hit
from services.rerank.diffusion import (
    DiffusionParams,
    affinity_from_edges,
    aggregate_scores,
    diffuse,
    knn_affinity,
    normalise_symmetric,
    query_seed,
)
from services.rerank.expansion import alpha_qe, dba


@dataclass(frozen=True)
class DiffusionOutcome:
    """Diffusion scores of the neighbourhood (aligned with the hits given) and CG iterations."""

    scores: np.ndarray  # (n,) float32, normalised so the best is 1
    iterations: int
    nodes: int


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


def diffusion_scores(
    query: np.ndarray,
    nodes: np.ndarray,
    node_owner: np.ndarray | None,
    n_images: int,
    params: DiffusionParams,
    extra_seeds: Mapping[int, float] | None = None,
    edges: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> DiffusionOutcome:
    """Diffuse from the query (and optional extra seeded images) over the neighbourhood graph.

    Parameters
    ----------
    query : (Q, D') or (D',)
        Query vector(s) in the indexed space: the global vector, or its regions.
    nodes : (N, D')
        Graph nodes: one per image (global) or its regions (regional, with ``node_owner``).
    node_owner : (N,) int or None
        Image index of each node.
    n_images : int
        Images in the neighbourhood.
    params : DiffusionParams
    extra_seeds : image index → weight
        Images known to match (e.g. geometrically verified): their nodes join the seed ``y``
        with ``weight`` × the query's largest seed value.
    edges : (src (E,), dst (E,), sim (E,)), optional
        Directed kNN edges among the nodes from the collection's offline graph
        (``CollectionGraph.neighbourhood_lists``); None builds the kNN graph of ``nodes`` here.
    """
    if edges is not None:
        W = affinity_from_edges(len(nodes), *edges, params.gamma, mutual=params.mutual)
    else:
        W = knn_affinity(nodes, min(params.k, max(1, len(nodes) - 1)), params.gamma, mutual=params.mutual)
    S = normalise_symmetric(W)
    y = query_seed(np.atleast_2d(query), nodes, params.kq, params.gamma)
    if extra_seeds:
        top = float(y.max()) if y.max() > 0 else 1.0
        owner = np.arange(len(nodes)) if node_owner is None else np.asarray(node_owner)
        for image, weight in extra_seeds.items():
            y[owner == image] = np.maximum(y[owner == image], weight * top)
    f, iterations = diffuse(S, y, params.alpha, params.max_iter, params.tol)
    scores = aggregate_scores(f, node_owner, n_images, params.aggregate)
    peak = float(scores.max())
    if peak > 0:
        scores = scores / peak
    return DiffusionOutcome(scores.astype(np.float32), int(iterations), int(len(nodes)))


def order_by(hits: Sequence[Hit], scores: np.ndarray) -> list[Hit]:
    """Hits re-sorted by ``scores`` (stable), with ``score`` replaced."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    return [dataclasses.replace(hits[i], score=float(scores[i])) for i in order]


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
