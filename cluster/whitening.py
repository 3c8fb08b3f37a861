"""Client side of ``loupe whiten``: learn the collection whitening, optionally from verified pairs.

``--whiten pca`` asks the broker for the PCA-whitening of a sample of the collection.
``--whiten verified`` first finds pairs of images that show the same object with nothing but the
collection itself: a sample of indexed images each searches by its id (its stored features,
nothing extracted) with geometric verification of its global top-``candidates``; every pair
that verifies (at least ``min_inliers`` inliers, 0 = the server's threshold) is kept once. The
broker then fits the learned whitening of Radenović et al. on those pairs (``FitWhitening``
with ``pairs``). No label is read; on the held-out protocol this gains ~10 Medium mAP
global-only on cropped queries (BENCHMARKS.md "Learned whitening from verified pairs").
"""

from __future__ import annotations

import random
from typing import Callable

import grpc

from loupe.client import RetrievalClient
from loupe.rerank_spec import parse_rerank
from loupe.v1 import retrieval_pb2

METHODS = ("pca", "verified")
DEFAULT_CANDIDATES = 30
DEFAULT_PAIR_QUERIES = 2000
DEFAULT_VERIFIED_DIM = 512
"""Output dimension of the learned whitening unless asked otherwise: on the held-out protocol 512
components scored within a point of all of them (BENCHMARKS.md), at 40 % of the index size."""
MIN_IMAGES_BY_DEFAULT = DEFAULT_VERIFIED_DIM
"""``loupe index`` whitens by default only a collection of at least this many images: a smaller
sample cannot give the default's 512 components, and on the 58-image demo collection the learned
whitening (57-D from 85 pairs) lowered global-only mAP from 100.0 to 96.6."""


class NoVerifiedPairs(ValueError):
    """No two indexed images verify as the same object (a small or very diverse collection)."""


def verified_pairs(
    client: RetrievalClient, candidates: int = DEFAULT_CANDIDATES, min_inliers: int = 0, max_queries: int = DEFAULT_PAIR_QUERIES,
    seed: int = 0, on_progress: Callable[[int, int], None] | None = None,
) -> list[tuple[str, str, int]]:
    """Pairs ``(a, b, inliers)`` of indexed images that verify, each unordered pair once (the
    larger inlier count of its two directions).

    Parameters
    ----------
    candidates : int
        Global neighbours verified per searching image (``verify:N``).
    min_inliers : int
        Inliers a verified pair needs (0 = every pair the server verifies).
    max_queries : int
        Images that search (a seeded random sample when the collection is larger; 0 = all).
    on_progress : callable or None
        ``(searched, pairs so far)`` after each search.
    """
    if candidates < 1:
        raise ValueError(f"candidates: must be >= 1, got {candidates}")
    ids = [im.id for im in client.iter_images(page_size=1000)]
    if max_queries and len(ids) > max_queries:
        ids = sorted(random.Random(seed).sample(ids, max_queries))
    rerank = parse_rerank(f"verify:{candidates}")
    best: dict[tuple[str, str], int] = {}
    for n, image_id in enumerate(ids, 1):
        resp = client.search(image_id=image_id, k=candidates, rerank=rerank, timeout_s=120.0)
        for r in resp.results:
            if r.verified and r.id != image_id and r.stages.inliers >= min_inliers:
                key = (min(image_id, r.id), max(image_id, r.id))
                best[key] = max(best.get(key, 0), r.stages.inliers)
        if on_progress is not None:
            on_progress(n, len(best))
    return [(a, b, n) for (a, b), n in sorted(best.items())]


def whiten(
    client: RetrievalClient, method: str = "pca", dim: int | None = None, candidates: int = DEFAULT_CANDIDATES, min_inliers: int = 0,
    max_queries: int = DEFAULT_PAIR_QUERIES, on_progress: Callable[[int, int], None] | None = None,
) -> retrieval_pb2.FitWhiteningResponse:
    """Learn and install the collection whitening by ``method`` (``METHODS``); returns the broker's answer.

    ``dim`` None: every component for ``pca`` (the server's default), ``DEFAULT_VERIFIED_DIM`` for
    ``verified`` (at most the raw stored dimension).

    Raises NoVerifiedPairs when ``verified`` finds no pair (too few images of the same object)."""
    if method not in METHODS:
        raise ValueError(f"whiten: method must be one of {METHODS}, got {method!r}")
    if method == "pca":
        return client.fit_whitening(dim=dim or 0)
    pairs = verified_pairs(client, candidates, min_inliers, max_queries, on_progress=on_progress)
    if not pairs:
        raise NoVerifiedPairs("whiten: no two indexed images verify as the same object (use pca)")
    if dim is None:  # capped at the raw stored dimension (a trained head may give fewer than 512)
        raw = client.get_images([pairs[0][0]], with_vector=True).images[0].vector
        dim = min(DEFAULT_VERIFIED_DIM, int(raw.shape[0]))
    return client.fit_whitening(dim=dim, pairs=[(a, b) for a, b, _ in pairs])


def after_index(client: RetrievalClient, method: str | None) -> tuple[retrieval_pb2.FitWhiteningResponse | None, str]:
    """The whitening step of ``loupe index`` / ``loupe eval`` / ``loupe demo``.

    ``method`` None is the default: ``verified`` on a collection of at least
    ``MIN_IMAGES_BY_DEFAULT`` images, nothing below that, when nothing verifies or when a call
    fails (the images are indexed by then: the reason is returned, not raised); ``"none"``
    skips; ``"pca"`` / ``"verified"`` are done as asked (errors propagate). Returns the broker's
    answer (None when nothing was fitted) and, when the default fitted nothing, why ("" otherwise)."""
    if method == "none":
        return None, ""
    if method is None:
        images = client.stats().images
        if images < MIN_IMAGES_BY_DEFAULT:
            return None, (f"whiten: {images} images indexed, the learned whitening needs at least {MIN_IMAGES_BY_DEFAULT} "
                          "(`loupe whiten verified` forces it); the collection stays unwhitened")
        try:
            return whiten(client, "verified"), ""
        except NoVerifiedPairs as exc:
            return None, f"{exc}; the collection stays unwhitened"
        except grpc.RpcError as exc:  # the images are indexed; a failed default step must not fail the indexing
            return None, (f"whiten: {exc.code().name}: {exc.details()}; the collection stays unwhitened "
                          "(`loupe whiten verified` retries)")
    return whiten(client, method), ""
