"""Per-image reduction of regional descriptors (Iscen et al., CVPR 2017, §4: each image's
R-MAC regions summarised by a few centroids, so regional diffusion needs fewer graph nodes).

Spherical k-means on each image's L2-normalised regional vectors, batched over images:
deterministic farthest-point initialisation from the first region (R-MAC's first region is the
whole image), then ``iterations`` rounds of assignment by inner product and centroid =
normalised sum of the assigned regions. Empty clusters keep their previous members. It runs on
each image's (R, R) Gram matrix, so the D-dimensional work is two batched products per call.
"""

from __future__ import annotations

import numpy as np

MAX_REGIONS_PER_IMAGE = 64
"""Most regional vectors an image may keep (configuration bound; R-MAC at L=3 gives ~21)."""


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
    # Everything runs on each image's (R, R) Gram matrix: a centroid is the normalised sum of
    # its members, so x_r . c_j = (G M^T)[r, j] / ||sum of members||, with M the (n, R) membership.
    G = np.matmul(X, np.ascontiguousarray(X.transpose(0, 2, 1)))  # (B, R, R)
    rows = np.arange(B)
    chosen = np.zeros((B, n), dtype=np.int64)
    nearest = G[:, :, 0].copy()  # similarity of each region to its closest seed
    for j in range(1, n):
        chosen[:, j] = np.argmin(nearest, axis=1)
        nearest = np.maximum(nearest, G[rows, :, chosen[:, j]])
    M = np.zeros((B, n, R), dtype=np.float32)
    M[rows[:, None], np.arange(n), chosen] = 1.0
    for _ in range(iterations):
        GM = np.matmul(G, M.transpose(0, 2, 1))  # (B, R, n): x_r . (sum of members of j)
        norms = np.sqrt(np.maximum(np.einsum("bnr,brn->bn", M, GM), 1e-12))  # ||sum of members||
        assign = np.argmax(GM / norms[:, None, :], axis=2)  # (B, R)
        new = (assign[:, None, :] == np.arange(n)[None, :, None]).astype(np.float32)
        empty = new.sum(axis=2) == 0  # keep an emptied cluster's previous members
        M = np.where(empty[:, :, None], M, new)
    C = np.matmul(M, X)  # (B, n, D)
    C /= np.maximum(np.linalg.norm(C, axis=2, keepdims=True), 1e-12)
    return C.astype(np.float32, copy=False)
