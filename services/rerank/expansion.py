"""Query expansion (αQE) and database-side augmentation (αDBA), Radenović et al. (TPAMI 2019).

Both replace a vector by the L2-normalised weighted sum of itself (weight 1) and its nearest
neighbours, each weighted by ``max(similarity, 0) ** alpha``; negative similarities are
clipped so that a dissimilar neighbour never pulls the vector away (and a fractional
``alpha`` stays defined). Vectors are expected L2-normalised, so similarity = inner product.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from services.rerank.diffusion import self_knn


def alpha_qe(
    query: np.ndarray, top_vectors: np.ndarray, n: int = 2, alpha: float = 3.0
) -> np.ndarray:
    """α-weighted query expansion.

    Parameters
    ----------
    query : np.ndarray, (D,)
        L2-normalised query vector.
    top_vectors : np.ndarray, (m, D)
        L2-normalised vectors of the query's results, best first.
    n : int
        Results used (the first ``min(n, m)``); typically 2 to 10, ``0`` returns the query.
    alpha : float
        Weight exponent, >= 0 (0: plain average QE).

    Returns
    -------
    np.ndarray, (D,) float32
        ``normalise(q + sum_i max(q . x_i, 0) ** alpha x_i)``.
    """
    q = _as_vectors(query, "query", ndim=1)
    top = _as_vectors(top_vectors, "top_vectors", ndim=2)
    if top.shape[1] != q.shape[0]:
        raise ValueError(f"top_vectors have dimension {top.shape[1]}, query has {q.shape[0]}")
    _check_count(n, "n")
    _check_alpha(alpha)
    top = top[:n]
    weights = np.maximum(top @ q, 0.0) ** np.float32(alpha)
    return _l2(q + weights @ top)


def dba(vectors: np.ndarray, k: int = 2, alpha: float = 3.0) -> np.ndarray:
    """α-weighted database-side augmentation within the given set.

    Each vector is expanded with its ``k`` nearest *other* vectors of ``vectors`` only.
    Applied to a query's truncated neighbourhood on the fly (rather than to the whole
    collection offline), the neighbours are those inside the neighbourhood, a slightly
    different (query-dependent) result from collection-wide DBA.

    Parameters
    ----------
    vectors : np.ndarray, (N, D)
        L2-normalised vectors.
    k : int
        Neighbours per vector (excluding itself), clipped to ``N - 1``; typically 2 to 10,
        ``0`` returns the vectors.
    alpha : float
        Weight exponent, >= 0.

    Returns
    -------
    np.ndarray, (N, D) float32
        ``normalise(x_i + sum_{j in kNN(i)} max(x_i . x_j, 0) ** alpha x_j)`` per row.
    """
    X = _as_vectors(vectors, "vectors", ndim=2)
    _check_count(k, "k")
    _check_alpha(alpha)
    if k == 0 or X.shape[0] == 1:
        return _l2(X)
    sims, ids = self_knn(X, k)
    weights = np.maximum(sims, 0.0) ** np.float32(alpha)  # (N, k')
    rows = np.repeat(np.arange(X.shape[0]), ids.shape[1])
    W = sp.csr_matrix((weights.ravel(), (rows, ids.ravel())), shape=(X.shape[0],) * 2)
    return _l2(X + W @ X)


def _as_vectors(x: np.ndarray, name: str, ndim: int) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != ndim or 0 in x.shape:
        raise ValueError(f"{name} must be a non-empty {ndim}-D array, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name} must be floating point, got dtype {x.dtype}")
    return np.ascontiguousarray(x, dtype=np.float32)


def _check_count(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


def _check_alpha(alpha: float) -> None:
    if not alpha >= 0.0:
        raise ValueError(f"alpha must be >= 0, got {alpha!r}")


def _l2(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norm, np.finfo(np.float32).tiny)).astype(np.float32)
