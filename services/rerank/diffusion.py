"""Diffusion on a truncated kNN graph (Iscen et al., CVPR 2017, "Efficient diffusion on
region manifolds"), for reranking the top-R neighbourhood of one query.

The graph is built on the fly over the neighbourhood's vectors (global vectors, or regional
vectors whose owners are images):

1. kNN of every node among the others (faiss ``IndexFlatIP``, exact inner product).
2. Affinity ``w_ij = max(s_ij, 0) ** gamma``, kept only for *mutual* neighbours (``i`` among
   ``j``'s k and ``j`` among ``i``'s k), as in the paper and its reference code; the
   max-symmetrised graph (either direction suffices) is an option. Zero diagonal.
3. ``S = D^-1/2 W D^-1/2``.
4. The query is not a node: like the paper's handling of unseen queries, it enters through
   ``y``: each query vector contributes its similarities to its ``kq`` nearest nodes, the
   contributions are summed per node, the ``kq`` largest sums are kept and raised to ``gamma``
   (all other entries 0). Several query vectors (the query's regions) cost one solve.
5. ``(I - alpha S) f = y`` by conjugate gradient from ``f = 0`` (as MATLAB's ``pcg`` in the
   reference code), at most ``max_iter`` iterations, relative residual ``tol``.
6. Regional nodes are pooled per image by ``sum`` (the paper pools with a sum; its GMP
   weights are not used) or ``max``.

Building the kNN graph costs O(N^2 D) and dominates for large N; callers that keep a graph
(the collection's offline kNN graph restricted to the neighbourhood,
``services.rerank.graph.CollectionGraph``, as the paper's truncated graph does) pass its edges
(:func:`affinity_from_edges`) and only the solve runs per query.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping

import faiss
import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import LinearOperator, cg

Aggregate = Literal["sum", "max"]


@dataclass(frozen=True)
class DiffusionParams:
    """Diffusion settings (paper defaults for global vectors; regional: ``k=200``).

    Attributes
    ----------
    k : int
        Neighbours per node in the affinity graph.
    kq : int
        Nodes seeded by the query in ``y``.
    alpha : float
        Diffusion weight, in (0, 1).
    gamma : float
        Similarity exponent, > 0.
    max_iter : int
        Conjugate-gradient iterations, >= 1.
    tol : float
        Conjugate-gradient relative residual tolerance, > 0.
    mutual : bool
        Keep only mutual kNN edges (paper) instead of the union of both directions.
    aggregate : {'sum', 'max'}
        How an image's score pools its nodes' scores (regional diffusion).
    """

    k: int = 50
    kq: int = 10
    alpha: float = 0.99
    gamma: float = 3.0
    max_iter: int = 20
    tol: float = 1e-6
    mutual: bool = True
    aggregate: Aggregate = "sum"

    def __post_init__(self) -> None:
        for name in ("k", "kq", "max_iter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DiffusionParams.{name} must be an integer >= 1, got {value!r}")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"DiffusionParams.alpha must be in (0, 1), got {self.alpha!r}")
        if not self.gamma > 0.0:
            raise ValueError(f"DiffusionParams.gamma must be > 0, got {self.gamma!r}")
        if not self.tol > 0.0:
            raise ValueError(f"DiffusionParams.tol must be > 0, got {self.tol!r}")
        if self.aggregate not in ("sum", "max"):
            raise ValueError(
                f"DiffusionParams.aggregate must be 'sum' or 'max', got {self.aggregate!r}"
            )


@dataclass(frozen=True)
class DiffusionOutcome:
    """Result of :func:`diffusion_rerank`.

    Attributes
    ----------
    scores : np.ndarray, (n_images,) float32
        Diffusion score per image, divided by the largest (the best is 1 unless all are 0).
    iterations : int
        Conjugate-gradient iterations used.
    nodes : int
        Graph nodes diffused over.
    """

    scores: np.ndarray
    iterations: int
    nodes: int


def self_knn(X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` most similar *other* rows by inner product (exact, faiss).

    Parameters
    ----------
    X : np.ndarray, (N, D) float32
        Vectors (L2-normalised for cosine similarity).
    k : int
        Neighbours per row; clipped to ``N - 1``.

    Returns
    -------
    sims : np.ndarray, (N, k') float32
        Similarities, descending per row, ``k' = min(k, N - 1)``.
    ids : np.ndarray, (N, k') int64
        Neighbour row indices, never the row itself.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return _self_knn(_as_matrix(X, "X"), k)


def _self_knn(X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    n = X.shape[0]
    k_eff = min(k, n - 1)
    if k_eff == 0:
        return np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int64)
    index = faiss.IndexFlatIP(X.shape[1])
    index.add(X)
    sims, ids = index.search(X, k_eff + 1)
    # Drop the row itself wherever it appears (ties may not put it first); rows where it is
    # absent (duplicate vectors) drop their last neighbour instead.
    is_self = ids == np.arange(n)[:, None]
    order = np.argsort(is_self, axis=1, kind="stable")[:, :k_eff]
    return np.take_along_axis(sims, order, 1), np.take_along_axis(ids, order, 1)


def knn_affinity(X: np.ndarray, k: int, gamma: float, *, mutual: bool = True) -> sp.csr_matrix:
    """Sparse symmetric kNN affinity ``W`` with ``w_ij = max(x_i . x_j, 0) ** gamma``.

    Parameters
    ----------
    X : np.ndarray, (N, D) float32
        L2-normalised vectors.
    k : int
        Neighbours per node (excluding itself).
    gamma : float
        Similarity exponent, > 0.
    mutual : bool
        ``True``: edge iff each node is among the other's k nearest (paper). ``False``: edge
        iff either is among the other's k nearest.

    Returns
    -------
    scipy.sparse.csr_matrix, (N, N) float32
        Symmetric, zero diagonal, no stored zeros.
    """
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return _knn_affinity(_as_matrix(X, "X"), k, gamma, mutual)


def _knn_affinity(X: np.ndarray, k: int, gamma: float, mutual: bool) -> sp.csr_matrix:
    sims, ids = _self_knn(X, k)
    n = sims.shape[0]
    return affinity_from_edges(n, np.repeat(np.arange(n), ids.shape[1]), ids.ravel(), sims.ravel(), gamma, mutual=mutual)


def affinity_from_edges(
    n: int, src: np.ndarray, dst: np.ndarray, sim: np.ndarray, gamma: float, *, mutual: bool = True
) -> sp.csr_matrix:
    """Symmetric affinity from directed kNN edges ``src -> dst`` ("dst is among src's nearest").

    Parameters
    ----------
    n : int
        Nodes.
    src, dst : ndarray ``(E,)`` int
        Edge endpoints in ``[0, n)``; self-loops are dropped.
    sim : ndarray ``(E,)`` float
        Similarity of each edge.
    gamma : float
        ``w = max(sim, 0) ** gamma``.
    mutual : bool
        Keep an edge only when both directions are listed (else either suffices).

    Returns
    -------
    scipy.sparse.csr_matrix, (N, N) float32
        Symmetric, zero diagonal, no stored zeros.
    """
    src, dst = np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)
    w = np.maximum(np.asarray(sim, dtype=np.float32), 0.0) ** np.float32(gamma)
    keep = (src != dst) & (w > 0)
    src, dst, w = src[keep], dst[keep], w[keep]
    pairs = _undirected_by_sparse(n, src, dst, w, mutual)
    if pairs is None:  # a directed edge listed twice: the grouping below handles it as it always has
        pairs = _undirected_by_sort(n, src, dst, w, mutual)
    lo, hi, weight = pairs
    rows, cols = np.concatenate([lo, hi]), np.concatenate([hi, lo])
    return sp.csr_matrix((np.concatenate([weight, weight]).astype(np.float32), (rows, cols)), shape=(n, n))


def _undirected_by_sparse(
    n: int, src: np.ndarray, dst: np.ndarray, w: np.ndarray, mutual: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The undirected edges ``(lo, hi, weight)`` in ``lo * n + hi`` order, from sparse matrix
    operations (several times faster than sorting the edge keys); None when a directed edge is
    listed twice (then :func:`_undirected_by_sort` keeps its behaviour). The same arrays as
    :func:`_undirected_by_sort` otherwise (``tests/unit/test_diffusion.py``)."""
    if not len(w):
        return None
    A = sp.csr_matrix((w, (src, dst)), shape=(n, n))
    A.sum_duplicates()  # canonical (sorted indices); merges a repeated edge, which we refuse
    if A.nnz != len(w):
        return None
    B = A.T.tocsr()
    B.sort_indices()
    # min (mutual: both directions listed, else 0 and dropped) / max (either direction)
    M = (A.minimum(B) if mutual else A.maximum(B)).tocoo()
    upper = M.row < M.col
    lo, hi, weight = M.row[upper].astype(np.int64), M.col[upper].astype(np.int64), M.data[upper]
    key = lo * n + hi
    if len(key) > 1 and not np.all(key[1:] > key[:-1]):  # canonical results come row-major already
        order = np.argsort(key, kind="stable")
        lo, hi, weight = lo[order], hi[order], weight[order]
    return lo, hi, weight.astype(np.float32)


def _undirected_by_sort(
    n: int, src: np.ndarray, dst: np.ndarray, w: np.ndarray, mutual: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The undirected edges ``(lo, hi, weight)`` in ``lo * n + hi`` order, by sorting the edge keys."""
    # Undirected edge key (min, max); a pair listed in both directions appears twice.
    lo, hi = np.minimum(src, dst), np.maximum(src, dst)
    key = lo * n + hi
    order = np.argsort(key, kind="stable")
    key, lo, hi, w = key[order], lo[order], hi[order], w[order]
    first = np.ones(len(key), dtype=bool)
    first[1:] = key[1:] != key[:-1]
    starts = np.flatnonzero(first)
    counts = np.diff(np.append(starts, len(key)))
    # min/max of the two directions keeps W exactly symmetric despite float round-off.
    weight = (np.minimum if mutual else np.maximum).reduceat(w, starts) if len(w) else w
    pick = counts >= 2 if mutual else np.ones(len(starts), dtype=bool)
    return lo[starts][pick], hi[starts][pick], weight[pick]


def normalise_symmetric(W: sp.spmatrix) -> sp.csr_matrix:
    """``S = D^-1/2 W D^-1/2`` with ``D = diag(W 1)``.

    Parameters
    ----------
    W : scipy.sparse matrix, (N, N)
        Symmetric non-negative affinity.

    Returns
    -------
    scipy.sparse.csr_matrix, (N, N)
        Same dtype as ``W``; rows and columns of isolated (zero-degree) nodes stay zero.
    """
    if W.ndim != 2 or W.shape[0] != W.shape[1]:
        raise ValueError(f"W must be square, got shape {W.shape}")
    S = sp.csr_matrix(W, copy=True)
    if S.nnz and S.data.min() < 0:
        raise ValueError("W must be non-negative")
    degree = np.asarray(S.sum(axis=1)).ravel()
    inv_sqrt = np.zeros_like(degree)
    np.divide(1.0, np.sqrt(degree), out=inv_sqrt, where=degree > 0)
    inv_sqrt = inv_sqrt.astype(S.dtype)
    S.data *= np.repeat(inv_sqrt, np.diff(S.indptr)) * inv_sqrt[S.indices]
    return S


def diffuse(
    S: sp.spmatrix, y: np.ndarray, alpha: float, max_iter: int, tol: float
) -> tuple[np.ndarray, int]:
    """Solve ``(I - alpha S) f = y`` by conjugate gradient, starting from ``f = 0``.

    Parameters
    ----------
    S : scipy.sparse matrix, (N, N)
        Symmetrically normalised affinity (eigenvalues in [-1, 1], so the system is SPD).
    y : np.ndarray, (N,)
        Seed vector.
    alpha : float
        In (0, 1).
    max_iter : int
        Iteration cap (the solution after ``max_iter`` iterations is returned).
    tol : float
        Relative residual ``||y - A f|| / ||y||`` at which CG stops early.

    Returns
    -------
    f : np.ndarray, (N,)
        In the dtype of ``S`` and ``y`` combined.
    n_iter : int
        Iterations performed.
    """
    n = S.shape[0]
    if S.ndim != 2 or S.shape[1] != n:
        raise ValueError(f"S must be square, got shape {S.shape}")
    y = np.asarray(y)
    if y.shape != (n,):
        raise ValueError(f"y must have shape ({n},), got {y.shape}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    dtype = np.result_type(S.dtype, y.dtype, np.float32)
    S = sp.csr_matrix(S, dtype=dtype)
    y = y.astype(dtype, copy=False)
    a = dtype.type(alpha)
    A = LinearOperator((n, n), matvec=lambda v: v - a * (S @ v), dtype=dtype)
    iterations = 0

    def count(_: np.ndarray) -> None:
        nonlocal iterations
        iterations += 1

    f, info = cg(A, y, rtol=tol, atol=0.0, maxiter=max_iter, callback=count)
    if info < 0:
        raise RuntimeError(f"conjugate gradient broke down (info={info})")
    return f.astype(dtype, copy=False), iterations


def query_seed(query: np.ndarray, nodes: np.ndarray, kq: int, gamma: float) -> np.ndarray:
    """The seed ``y`` of an unseen query (the paper's new-query construction).

    Parameters
    ----------
    query : np.ndarray, (Q, D)
        L2-normalised query vectors (its global vector, or its regional vectors).
    nodes : np.ndarray, (N, D)
        L2-normalised graph nodes.
    kq : int
        Each query vector's nearest nodes considered, and nodes kept in ``y``.
    gamma : float
        Exponent, > 0.

    Returns
    -------
    np.ndarray, (N,) float32
        ``y_i = max(sum_q s(q, x_i), 0) ** gamma`` on the ``kq`` nodes with the largest sums,
        where a query vector contributes only to its own ``kq`` nearest nodes; 0 elsewhere.
    """
    query, nodes = _as_matrix(query, "query"), _as_matrix(nodes, "nodes", finite=False)
    _check_dims(query, nodes)
    if kq < 1:
        raise ValueError(f"kq must be >= 1, got {kq}")
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    return _seed(query, nodes, kq, gamma)


def _seed(query: np.ndarray, nodes: np.ndarray, kq: int, gamma: float) -> np.ndarray:
    n = nodes.shape[0]
    kq = min(kq, n)
    sims = (nodes @ query.T).T  # (Q, N): one BLAS product over the contiguous nodes
    # a non-finite entry anywhere in a node row makes its products with every (finite) query row
    # non-finite (inf * 0 is nan), so this (Q, N) check stands for a scan of the whole (N, D) nodes
    if not np.isfinite(sims).all():
        raise ValueError("nodes holds non-finite values")
    nearest = np.argpartition(-sims, kq - 1, axis=1)[:, :kq]
    accumulated = np.bincount(
        nearest.ravel(), weights=np.take_along_axis(sims, nearest, 1).ravel(), minlength=n
    )
    touched = np.unique(nearest)
    if touched.size > kq:
        touched = touched[np.argpartition(-accumulated[touched], kq - 1)[:kq]]
    y = np.zeros(n, dtype=np.float32)
    y[touched] = np.maximum(accumulated[touched], 0.0) ** gamma
    return y


def aggregate_scores(
    f: np.ndarray, node_owner: np.ndarray | None, n_images: int, how: Aggregate = "sum"
) -> np.ndarray:
    """Pool node scores into image scores.

    Parameters
    ----------
    f : np.ndarray, (N,)
        Node scores.
    node_owner : np.ndarray of int, (N,), or None
        Image index of each node in ``[0, n_images)``; ``None`` means node ``i`` is image
        ``i`` (global diffusion, ``N == n_images``).
    n_images : int
    how : {'sum', 'max'}

    Returns
    -------
    np.ndarray, (n_images,) float32
        Pooled scores; an image that owns no node scores 0.
    """
    f = np.asarray(f)
    if node_owner is None:
        if f.shape != (n_images,):
            raise ValueError(
                f"without node_owner there must be one node per image: {f.shape[0]} nodes, "
                f"{n_images} images"
            )
        return f.astype(np.float32, copy=False)
    owner = np.asarray(node_owner)
    if owner.shape != f.shape or owner.dtype.kind not in "iu":
        raise ValueError(f"node_owner must be {f.shape} integers, got {owner.shape} {owner.dtype}")
    if owner.size and (owner.min() < 0 or owner.max() >= n_images):
        raise ValueError(f"node_owner holds image indices outside [0, {n_images})")
    if how == "sum":
        return np.bincount(owner, weights=f, minlength=n_images).astype(np.float32)
    if how == "max":
        scores = np.full(n_images, -np.inf, dtype=np.float32)
        np.maximum.at(scores, owner, f.astype(np.float32, copy=False))
        scores[np.isneginf(scores)] = 0.0
        return scores
    raise ValueError(f"how must be 'sum' or 'max', got {how!r}")


def diffusion_rerank(
    query: np.ndarray,
    nodes: np.ndarray,
    node_owner: np.ndarray | None,
    n_images: int,
    params: DiffusionParams = DiffusionParams(),
    *,
    seeds: Mapping[int, float] | None = None,
    edges: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> DiffusionOutcome:
    """Diffuse from the query (and optional seeded images) over the neighbourhood graph.

    The one diffusion entry point: the broker's diffusion stage and the benchmarks call it.

    Parameters
    ----------
    query : np.ndarray, (Q, D) or (D,)
        L2-normalised query vector(s) in the indexed space: its global vector, or its regional
        vectors (they jointly seed ``y``; one solve whatever ``Q``).
    nodes : np.ndarray, (N, D)
        L2-normalised graph nodes: one per image (global) or several (regional, with
        ``node_owner``).
    node_owner : np.ndarray of int, (N,), or None
        Image index of each node, or ``None`` when node ``i`` is image ``i``.
    n_images : int
        Images in the neighbourhood, >= 1.
    params : DiffusionParams
    seeds : mapping image index -> weight, optional
        Images known to match (e.g. geometrically verified): their nodes join the seed ``y``
        with ``weight`` x the query's largest seed value.
    edges : (src (E,), dst (E,), sim (E,)), optional
        Directed kNN edges among the nodes from the collection's offline graph
        (``CollectionGraph.neighbourhood_lists``); None builds the kNN graph of ``nodes`` here
        (``params.k`` neighbours, at most N - 1).

    Returns
    -------
    DiffusionOutcome
        Image scores (higher is better, the best is 1), CG iterations, node count.
    """
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    nodes = _as_matrix(nodes, "nodes", finite=False)  # the seed's product checks the nodes (``_seed``)
    y = query_seed(np.atleast_2d(query), nodes, params.kq, params.gamma)
    if edges is not None:
        W = affinity_from_edges(len(nodes), *edges, params.gamma, mutual=params.mutual)
    else:
        W = knn_affinity(nodes, min(params.k, max(1, len(nodes) - 1)), params.gamma, mutual=params.mutual)
    S = normalise_symmetric(W)
    if seeds:
        top = float(y.max()) if y.max() > 0 else 1.0
        owner = np.arange(len(nodes)) if node_owner is None else np.asarray(node_owner)
        for image, weight in seeds.items():
            y[owner == image] = np.maximum(y[owner == image], weight * top)
    f, iterations = diffuse(S, y, params.alpha, params.max_iter, params.tol)
    scores = aggregate_scores(f, node_owner, n_images, params.aggregate)
    peak = float(scores.max())
    if peak > 0:
        scores = scores / peak
    return DiffusionOutcome(scores.astype(np.float32), int(iterations), int(len(nodes)))


def _check_dims(query: np.ndarray, nodes: np.ndarray) -> None:
    if query.shape[1] != nodes.shape[1]:
        raise ValueError(f"query has dimension {query.shape[1]} but nodes have {nodes.shape[1]}")


def _as_matrix(X: np.ndarray, name: str, *, finite: bool = True) -> np.ndarray:
    """``X`` as a contiguous float32 ``(N, D)`` matrix; ValueError naming ``name`` when it is not
    one (or, with ``finite``, holds a non-finite value)."""
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[0] < 1 or X.shape[1] < 1:
        raise ValueError(f"{name} must be a non-empty (N, D) matrix, got shape {X.shape}")
    if not np.issubdtype(X.dtype, np.floating):
        raise ValueError(f"{name} must be floating point, got dtype {X.dtype}")
    X = np.ascontiguousarray(X, dtype=np.float32)
    if finite and not np.isfinite(X).all():
        raise ValueError(f"{name} holds non-finite values")
    return X
