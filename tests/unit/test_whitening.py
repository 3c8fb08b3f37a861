"""PCAWhitening and LocalPCA on synthetic data."""

from __future__ import annotations

import numpy as np
import pytest

from services.space.whitening import LocalPCA, PCAWhitening


def _correlated(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) * np.geomspace(10.0, 0.5, d)  # anisotropic
    return (rng.normal(size=(n, d)) @ mixing.T + 5.0).astype(np.float32)


def _unnormalised(w: PCAWhitening, X: np.ndarray) -> np.ndarray:
    return ((X - w.mean) @ w.components.T) * w.scale


def test_whitened_covariance_is_identity() -> None:
    X = _correlated(4000, 16)
    w = PCAWhitening().fit(X)
    Y = _unnormalised(w, X)
    np.testing.assert_allclose(Y.mean(axis=0), 0.0, atol=1e-3)
    np.testing.assert_allclose(np.cov(Y.T, bias=True), np.eye(16), atol=1e-3)
    out = w.apply(X)
    assert out.shape == (4000, 16) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_dim_keeps_top_variance_components() -> None:
    X = _correlated(2000, 12)
    w = PCAWhitening().fit(X, dim=5)
    assert w.output_dim == 5 and w.input_dim == 12 and w.apply(X).shape == (2000, 5)
    assert np.all(np.diff(w.eigvals) <= 0)
    full = np.linalg.eigvalsh(np.cov(X.T.astype(np.float64), bias=True))[::-1]
    np.testing.assert_allclose(w.eigvals, full[:5], rtol=1e-4)


def test_fewer_samples_than_dimensions() -> None:
    X = _correlated(10, 64)
    w = PCAWhitening().fit(X)
    assert w.output_dim == 9  # rank of the centred data
    assert np.isfinite(w.apply(X)).all()
    assert PCAWhitening().fit(X, dim=32).output_dim == 9


def test_degenerate_directions_are_regularised() -> None:
    X = _correlated(500, 8)
    X[:, 3] = 1.0  # zero-variance column
    out = PCAWhitening().fit(X).apply(X)
    assert np.isfinite(out).all()


def test_shrinkage_interpolates_to_plain_pca() -> None:
    X = _correlated(1000, 6)
    w = PCAWhitening().fit(X, shrinkage=1.0)
    np.testing.assert_allclose(w.scale, w.scale[0])  # isotropic: a pure rotation
    with pytest.raises(ValueError, match="shrinkage"):
        PCAWhitening().fit(X, shrinkage=1.5)


def test_whitening_example_by_hand() -> None:
    # Points on the x axis with variance 4 and on the y axis with variance 1.
    X = np.array([[2, 0], [-2, 0], [0, 1], [0, -1]], dtype=np.float32) + 3.0
    w = PCAWhitening().fit(X)
    np.testing.assert_allclose(w.mean, [3, 3])
    np.testing.assert_allclose(w.eigvals, [2.0, 0.5], rtol=1e-6)  # cov = diag(8, 2) / 4
    np.testing.assert_allclose(np.abs(w.components), np.eye(2), atol=1e-6)
    np.testing.assert_allclose(w.scale, [2**-0.5, 2**0.5], rtol=1e-6)
    y = w.apply(np.array([[4.0, 4.0]], np.float32))  # (1/sqrt2, sqrt2) -> L2
    np.testing.assert_allclose(np.abs(y), [[0.4472136, 0.8944272]], rtol=1e-5)


@pytest.mark.parametrize("cls", [PCAWhitening, LocalPCA])
def test_serialisation_round_trip(cls: type) -> None:
    X = _correlated(300, 48)
    p = cls().fit(X)
    q = cls.from_bytes(p.to_bytes())
    np.testing.assert_array_equal(q.apply(X), p.apply(X))


def test_serialised_kinds_are_not_interchangeable() -> None:
    data = LocalPCA().fit(_correlated(300, 48)).to_bytes()
    with pytest.raises(ValueError, match="local_pca"):
        PCAWhitening.from_bytes(data)
    with pytest.raises(ValueError):
        PCAWhitening.from_bytes(b"garbage")


def test_local_pca_reduces_to_40_without_whitening() -> None:
    X = _correlated(2000, 128)
    pca = LocalPCA().fit(X)
    out = pca.apply(X)
    assert out.shape == (2000, 40) and pca.output_dim == 40
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(pca.scale, 1.0)
    # The projection is orthonormal: unnormalised outputs keep the top-40 variances.
    Y = (X - pca.mean) @ pca.components.T
    np.testing.assert_allclose(Y.var(axis=0), pca.eigvals, rtol=1e-3)
    assert LocalPCA().fit(X, dim=16, whiten=True).scale.shape == (16,)


def test_input_validation() -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        PCAWhitening().apply(np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="at least 2 rows"):
        PCAWhitening().fit(np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match="dim"):
        PCAWhitening().fit(_correlated(10, 4), dim=5)
    w = PCAWhitening().fit(_correlated(10, 4))
    with pytest.raises(ValueError, match="dimension 5"):
        w.apply(np.zeros((2, 5), np.float32))
    bad = _correlated(10, 4)
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        PCAWhitening().fit(bad)


def _objects_with_nuisance(n_objects: int, views: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Views of objects: identity in dims 1.., a large per-view nuisance in dim 0. Returns
    ``(X (n_objects * views, d), object label per row)``."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_objects, d))
    centres[:, 0] = 0.0
    X = np.repeat(centres, views, axis=0) + 0.05 * rng.normal(size=(n_objects * views, d))
    X[:, 0] += 20.0 * rng.normal(size=n_objects * views)  # varies between two photos of one object
    return X.astype(np.float32), np.repeat(np.arange(n_objects), views)


def _pairs_of(labels: np.ndarray) -> np.ndarray:
    return np.array([(i, j) for i in range(len(labels)) for j in range(i + 1, len(labels)) if labels[i] == labels[j]])


def test_learned_whitening_damps_what_varies_between_views_of_one_object() -> None:
    X, labels = _objects_with_nuisance(40, 3, 8)
    pairs = _pairs_of(labels)
    lw = PCAWhitening().fit_pairs(X, X[pairs[:, 0]], X[pairs[:, 1]], shrinkage=0.0)  # 120 pairs > 8 dims: S is invertible

    def top1_is_same_object(Y: np.ndarray) -> float:
        s = Y @ Y.T
        np.fill_diagonal(s, -np.inf)
        return float(np.mean(labels[np.argmax(s, axis=1)] == labels))

    # the nuisance dominates the raw vectors; the pairs teach the projection to ignore it
    assert top1_is_same_object(X / np.linalg.norm(X, axis=1, keepdims=True)) < 0.5
    assert top1_is_same_object(lw.apply(X)) == 1.0
    assert np.abs(lw.components[:, 0]).max() < 0.05 * np.abs(lw.components[:, 1:]).max()
    # the rotation orders components by the whitened collection's variance; scale stays 1
    assert np.all(np.diff(lw.eigvals) <= 0) and np.all(lw.scale == 1.0)
    assert lw.output_dim == 8 and PCAWhitening().fit_pairs(X, X[pairs[:, 0]], X[pairs[:, 1]], dim=3).output_dim == 3
    q = PCAWhitening.from_bytes(lw.to_bytes())  # the same payload the shards install
    np.testing.assert_array_equal(q.apply(X), lw.apply(X))


def test_learned_whitening_from_a_few_pairs_is_defined() -> None:
    X = _correlated(50, 16)
    lw = PCAWhitening().fit_pairs(X, X[:2], X[2:4])  # 2 pairs, rank-2 covariance: shrinkage makes it invertible
    assert np.isfinite(lw.apply(X)).all() and lw.output_dim == 16


def test_learned_whitening_input_validation() -> None:
    X = _correlated(20, 4)
    with pytest.raises(ValueError, match="A and B"):
        PCAWhitening().fit_pairs(X, X[:3], X[:2])
    with pytest.raises(ValueError, match="A and B"):
        PCAWhitening().fit_pairs(X, X[:3, :3], X[:3, :3])
    with pytest.raises(ValueError, match="shrinkage"):
        PCAWhitening().fit_pairs(X, X[:3], X[3:6], shrinkage=1.0)
    with pytest.raises(ValueError, match="dim"):
        PCAWhitening().fit_pairs(X, X[:3], X[3:6], dim=5)
    with pytest.raises(ValueError, match="non-empty"):
        PCAWhitening().fit_pairs(X, X[:0], X[:0])
    bad = X[:3].copy()
    bad[1, 2] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        PCAWhitening().fit_pairs(X, bad, X[3:6])
