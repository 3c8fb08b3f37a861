"""Learned PCA projections: whitening of global descriptors and PCA of local descriptors.

``PCAWhitening`` is a linear projection ``y = l2n((x - mean) @ components.T * scale)`` fitted
one of two ways:

- ``fit``: the unsupervised PCA-whitening of Radenović et al. / Tolias et al. (cirtorch's
  ``pcawhitenlearn``): centre, project on the covariance eigenvectors scaled by
  ``eigval^-1/2``, keep the top ``dim`` components;
- ``fit_pairs``: the *learned* whitening of Radenović et al. (TPAMI 2019, cirtorch's
  ``whitenlearn``) from pairs of matching images: whiten the within-pair differences, then
  rotate onto the principal directions of the whitened collection.

``LocalPCA`` is the DELF dimensionality reduction (to 40-D by default): PCA without whitening.

Both serialise to ``.npz`` bytes (``to_bytes`` / ``from_bytes``), no pickle.
"""

from __future__ import annotations

import io
from typing import ClassVar, TypeVar

import numpy as np

L2_EPS = 1e-6
EIG_FLOOR = 1e-6  # eigenvalues below EIG_FLOOR * largest are clamped to it before ^-1/2
_CHUNK_ROWS = 65536
PAIR_SHRINKAGE = 0.3
"""Default shrinkage of the pairs' covariance in :meth:`PCAWhitening.fit_pairs` (0.1 and 0.3
measured within a point of each other on the held-out protocol; BENCHMARKS.md "Learned whitening")."""

_P = TypeVar("_P", bound="_PCAProjection")


def _check_matrix(X: np.ndarray, name: str = "X") -> np.ndarray:
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty (N, D) matrix, got shape {X.shape}")
    return X


def _l2n(X: np.ndarray) -> np.ndarray:
    return X / (np.linalg.norm(X, axis=1, keepdims=True) + L2_EPS)


def _fit_input(X: np.ndarray, dim: int | None) -> tuple[np.ndarray, int]:
    """``X`` checked for fitting (at least 2 finite rows) and the output dimension: ``dim``
    (1..D; None = all) capped at the rank of the centred data, ``min(N - 1, D)``."""
    X = _check_matrix(X)
    n, d = X.shape
    if n < 2:
        raise ValueError(f"X needs at least 2 rows to fit a projection, got {n}")
    if not np.isfinite(X).all():
        raise ValueError("X contains NaN or infinite values")
    if dim is not None and not 1 <= dim <= d:
        raise ValueError(f"dim must be in [1, {d}] (input dimension), got {dim!r}")
    rank = min(n - 1, d)
    return X, rank if dim is None else min(dim, rank)


def _covariance(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and covariance ``(D, D)`` in float64, accumulated in row chunks."""
    n, d = X.shape
    mean = X.sum(axis=0, dtype=np.float64) / n
    cov = np.zeros((d, d), dtype=np.float64)
    for start in range(0, n, _CHUNK_ROWS):
        xc = X[start : start + _CHUNK_ROWS].astype(np.float64) - mean
        cov += xc.T @ xc
    return mean, cov / n


class _PCAProjection:
    """Shared state and behaviour: ``y = l2n(((x - mean) @ components.T) * scale)``.

    ``components`` is ``(D', D)`` (rows = principal directions, by decreasing variance),
    ``eigvals`` the matching ``(D',)`` variances and ``scale`` the per-component factor
    (``eigval^-1/2`` when whitening, ones otherwise).
    """

    _KIND: ClassVar[str]

    def __init__(self) -> None:
        self.mean: np.ndarray | None = None
        self.components: np.ndarray | None = None
        self.eigvals: np.ndarray | None = None
        self.scale: np.ndarray | None = None

    @property
    def input_dim(self) -> int:
        """Input dimension ``D``."""
        return self._state()[1].shape[1]

    @property
    def output_dim(self) -> int:
        """Output dimension ``D'``."""
        return self._state()[1].shape[0]

    def _fit(self, X: np.ndarray, dim: int | None, whiten: bool, shrinkage: float) -> None:
        if not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage!r}")
        X, dim = _fit_input(X, dim)
        d = X.shape[1]
        mean, cov = _covariance(X)
        eigvals, eigvecs = np.linalg.eigh(cov)  # ascending
        total_var = float(eigvals.clip(min=0.0).sum())
        order = np.argsort(eigvals)[::-1][:dim]
        vals = eigvals[order].clip(min=0.0)
        self.mean = mean.astype(np.float32)
        self.components = np.ascontiguousarray(eigvecs[:, order].T, dtype=np.float32)
        self.eigvals = vals.astype(np.float32)
        if whiten:
            shrunk = (1.0 - shrinkage) * vals + shrinkage * (total_var / d)
            floor = EIG_FLOOR * max(float(shrunk[0]), np.finfo(np.float64).tiny)
            self.scale = (1.0 / np.sqrt(np.maximum(shrunk, floor))).astype(np.float32)
        else:
            self.scale = np.ones(dim, dtype=np.float32)

    def apply(self, X: np.ndarray) -> np.ndarray:
        """Project and L2-normalise: ``(N, D) -> (N, D')`` float32."""
        mean, components, scale = self._state()
        X = _check_matrix(X)
        if X.shape[1] != mean.shape[0]:
            raise ValueError(f"X has dimension {X.shape[1]}, this projection expects {mean.shape[0]}")
        Y = (X.astype(np.float32, copy=False) - mean) @ components.T
        return _l2n(Y * scale).astype(np.float32, copy=False)

    def to_bytes(self) -> bytes:
        """Serialise to ``.npz`` bytes."""
        mean, components, scale = self._state()
        buf = io.BytesIO()
        np.savez(buf, kind=np.array(self._KIND), mean=mean, components=components,
                 eigvals=self.eigvals, scale=scale)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls: type[_P], data: bytes) -> _P:
        """Load from :meth:`to_bytes` output; raises ValueError if malformed or of another kind."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                arrays = {k: z[k] for k in ("kind", "mean", "components", "eigvals", "scale")}
        except (OSError, ValueError, KeyError, EOFError) as e:
            raise ValueError(f"not a serialised {cls.__name__}: {e}") from e
        if str(arrays["kind"]) != cls._KIND:
            raise ValueError(f"serialised projection is {str(arrays['kind'])!r}, expected {cls._KIND!r}")
        k, d = arrays["components"].shape
        if arrays["mean"].shape != (d,) or arrays["eigvals"].shape != (k,) or arrays["scale"].shape != (k,):
            raise ValueError(f"inconsistent shapes in serialised {cls.__name__}")
        obj = cls()
        obj.mean, obj.components = arrays["mean"], arrays["components"]
        obj.eigvals, obj.scale = arrays["eigvals"], arrays["scale"]
        return obj

    def _state(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.mean is None or self.components is None or self.scale is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted")
        return self.mean, self.components, self.scale


class PCAWhitening(_PCAProjection):
    """Learned PCA-whitening of global descriptors.

    Examples
    --------
    >>> w = PCAWhitening().fit(train_vectors, dim=512)   # (N, 1280) -> 512-D
    >>> w.apply(vectors).shape
    (M, 512)
    """

    _KIND = "pca_whitening"

    def fit(self, X: np.ndarray, dim: int | None = None, shrinkage: float = 0.0) -> PCAWhitening:
        """Learn mean and whitening projection.

        Parameters
        ----------
        X : ndarray ``(N, D)``
            Training descriptors (N >= 2).
        dim : int or None
            Output dimension ``D'`` (default: all). Capped at ``min(N - 1, D)``, the rank of
            the centred data, so ``N < D`` is handled by keeping the top ``N - 1`` components.
        shrinkage : float in [0, 1]
            Eigenvalues become ``(1 - s) * eigval + s * mean_eigval`` before ``^-1/2``:
            0 is full whitening, 1 plain PCA rotation. Eigenvalues below ``1e-6`` x the
            largest are clamped.

        Returns
        -------
        PCAWhitening
            ``self``.
        """
        self._fit(X, dim, whiten=True, shrinkage=shrinkage)
        return self

    def fit_pairs(self, X: np.ndarray, A: np.ndarray, B: np.ndarray, dim: int | None = None,
                  shrinkage: float = PAIR_SHRINKAGE) -> PCAWhitening:
        """Learned whitening from matching pairs (Radenović et al., TPAMI 2019).

        ``S = mean((a - b)(a - b)^T)`` over the pairs, shrunk towards its mean eigenvalue;
        ``P1 = S^-1/2`` whitens what varies between two photos of the same object; the rows of
        ``P1`` are then rotated onto the principal directions of the whitened collection ``X``
        and the top ``dim`` kept (``components = V^T P1``, ``scale`` = 1): directions in which
        matching photos differ are damped, directions that separate the collection kept. The
        centre is the collection's mean (cirtorch centres on the pairs' query images; on the
        held-out protocol the collection's mean scored 7 Medium points more on cropped queries
        than the pairs' mean, which the most-photographed landmarks dominate).

        Parameters
        ----------
        X : ndarray ``(N, D)``
            Collection descriptors (N >= 2) for the rotation.
        A, B : ndarray ``(P, D)``
            Descriptors of the pairs' two images, row ``i`` of each showing the same object
            (P >= 1).
        dim : int or None
            Output dimension (default all; capped at ``min(N - 1, D)`` like :meth:`fit`).
        shrinkage : float in [0, 1)
            ``S`` becomes ``(1 - s) S + s * mean_eigval * I`` before ``^-1/2``: with few pairs
            (fewer than ``D``) ``S`` is singular and must be shrunk.

        Returns
        -------
        PCAWhitening
            ``self``.
        """
        X, dim = _fit_input(X, dim)
        d = X.shape[1]
        A, B = _check_matrix(A, "A"), _check_matrix(B, "B")
        if A.shape != B.shape or A.shape[1] != d:
            raise ValueError(f"A and B must both be (P, {d}), got {A.shape} and {B.shape}")
        if not (np.isfinite(A).all() and np.isfinite(B).all()):
            raise ValueError("A or B contains NaN or infinite values")
        if not 0.0 <= shrinkage < 1.0:
            raise ValueError(f"shrinkage must be in [0, 1), got {shrinkage!r}")
        diff = A.astype(np.float64) - B.astype(np.float64)
        s = diff.T @ diff / len(diff)
        s = (1.0 - shrinkage) * s + shrinkage * (np.trace(s) / d) * np.eye(d)
        vals, vecs = np.linalg.eigh(s)
        vals = np.maximum(vals, EIG_FLOOR * max(float(vals[-1]), np.finfo(np.float64).tiny))
        p1 = (vecs / np.sqrt(vals)) @ vecs.T  # S^-1/2, symmetric
        mean, cov = _covariance(X)
        rvals, rvecs = np.linalg.eigh(p1 @ cov @ p1)  # the covariance of the whitened collection (X - mean) @ P1
        order = np.argsort(rvals)[::-1][:dim]
        self.mean = mean.astype(np.float32)
        self.components = np.ascontiguousarray(rvecs[:, order].T @ p1, dtype=np.float32)
        self.eigvals = rvals[order].clip(min=0.0).astype(np.float32)
        self.scale = np.ones(dim, dtype=np.float32)
        return self


class LocalPCA(_PCAProjection):
    """PCA reduction of local descriptors (DELF: 40-D), optionally whitened."""

    _KIND = "local_pca"

    def fit(self, X: np.ndarray, dim: int = 40, whiten: bool = False) -> LocalPCA:
        """Learn mean and the top-``dim`` principal directions.

        Parameters
        ----------
        X : ndarray ``(N, D)``
            Training descriptors (N >= 2); covariance is accumulated in chunks, so N may be
            millions.
        dim : int
            Output dimension (capped at ``min(N - 1, D)``).
        whiten : bool
            Scale components by ``eigval^-1/2``.

        Returns
        -------
        LocalPCA
            ``self``.
        """
        self._fit(X, dim, whiten=whiten, shrinkage=0.0)
        return self


def to_indexed_space(raw: np.ndarray, whitening: PCAWhitening | None) -> np.ndarray:
    """(n, D) raw L2-normalised descriptors → (n, D') float32 as the collection indexes them.

    Whitened (and L2-normalised) when the collection has a whitening, else only
    re-normalised. Shards (stored vectors) and the broker (queries) both call this, so the
    two sides can never disagree.
    """
    x = np.atleast_2d(np.asarray(raw, dtype=np.float32))
    if whitening is not None:
        return whitening.apply(x).astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
