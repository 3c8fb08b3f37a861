"""Per-image reduction of regional descriptors (Iscen et al., CVPR 2017, §4: each image's
R-MAC regions summarised by a few centroids, so regional diffusion needs fewer graph nodes).

Spherical k-means on each image's L2-normalised regional vectors, batched over images:
deterministic farthest-point initialisation from the first region (R-MAC's first region is the
whole image), then ``iterations`` rounds of assignment by inner product and centroid =
normalised sum of the assigned regions. Empty clusters keep their previous centroid.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def reduce_regions(regions: np.ndarray, n: int, iterations: int = 10) -> np.ndarray:
    """Summarise each image's regions by ``n`` centroids.

    Parameters
    ----------
    regions : ndarray ``(B, R, D)`` float
        L2-normalised regional vectors of ``B`` images (``R`` regions each).
    n : int
        Centroids per image, ``>= 1``; images with ``R <= n`` regions are returned unchanged.
    iterations : int
        k-means rounds, ``>= 0`` (0 = the farthest-point seeds themselves).

    Returns
    -------
    ndarray ``(B, min(n, R), D)`` float32
        L2-normalised centroids; the first one starts from the whole-image region.
    """
    X = np.asarray(regions, dtype=np.float32)
    if X.ndim != 3 or 0 in X.shape:
        raise ValueError(f"regions must be a non-empty (B, R, D) array, got shape {X.shape}")
    if n < 1 or iterations < 0:
        raise ValueError(f"need n >= 1 and iterations >= 0, got n={n}, iterations={iterations}")
    B, R, D = X.shape
    if R <= n:
        return X.copy()
    batch = np.arange(B)[:, None]
    # farthest-point seeds: each next seed is the region least similar to its nearest seed
    chosen = np.zeros((B, n), dtype=np.int64)
    nearest = np.einsum("brd,bd->br", X, X[:, 0])
    for j in range(1, n):
        chosen[:, j] = np.argmin(nearest, axis=1)
        nearest = np.maximum(nearest, np.einsum("brd,bd->br", X, X[np.arange(B), chosen[:, j]]))
    C = X[batch, chosen]  # (B, n, D)
    for _ in range(iterations):
        assign = np.argmax(np.einsum("brd,bnd->brn", X, C), axis=2)  # (B, R)
        sums = np.zeros_like(C)
        np.add.at(sums, (np.repeat(np.arange(B), R), assign.ravel()), X.reshape(B * R, D))
        norms = np.linalg.norm(sums, axis=2, keepdims=True)
        C = np.where(norms > 0, sums / np.maximum(norms, 1e-12), C)
    return C.astype(np.float32, copy=False)


def reduce_each(per_image: Sequence[np.ndarray], n: int, iterations: int = 10) -> list[np.ndarray]:
    """:func:`reduce_regions` over images with different region counts (batched by count).

    Parameters
    ----------
    per_image : sequence of ndarray ``(R_i, D)``
    n : int
        Centroids per image.

    Returns
    -------
    list of ndarray ``(min(n, R_i), D)`` float32, aligned with ``per_image``.
    """
    out: list[np.ndarray] = [np.zeros((0, 0), np.float32)] * len(per_image)
    counts = np.array([len(r) for r in per_image])
    for c in np.unique(counts):
        idx = np.flatnonzero(counts == c)
        if c == 0:
            for i in idx:
                out[i] = np.asarray(per_image[i], dtype=np.float32)
            continue
        reduced = reduce_regions(np.stack([per_image[i] for i in idx]), n, iterations)
        for j, i in enumerate(idx):
            out[i] = reduced[j]
    return out
