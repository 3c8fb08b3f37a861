"""Tests for services.rerank.expansion."""

from __future__ import annotations

import numpy as np
import pytest

from services.rerank.expansion import alpha_qe, dba

E1 = np.array([1.0, 0.0], dtype=np.float32)
E2 = np.array([0.0, 1.0], dtype=np.float32)
DIAG = np.array([1.0, 1.0], dtype=np.float32) / np.sqrt(2.0)


def _circle(angles) -> np.ndarray:
    a = np.asarray(angles, dtype=np.float64)
    return np.stack([np.cos(a), np.sin(a)], axis=1).astype(np.float32)


def test_alpha_qe_by_hand():
    # q = e1, first result d = (e1 + e2)/sqrt2 with s = 1/sqrt2, alpha = 2 -> weight 1/2:
    # q + d/2 = (1 + 1/(2 sqrt2), 1/(2 sqrt2)) = (1.35355, 0.35355), then L2-normalised.
    out = alpha_qe(E1, np.stack([DIAG, E2]), n=1, alpha=2.0)
    expected = np.array([1 + 0.5 / np.sqrt(2), 0.5 / np.sqrt(2)])
    np.testing.assert_allclose(out, expected / np.linalg.norm(expected), rtol=1e-6)
    # The second result e2 has s = 0, so weight 0: n=2 gives the same vector.
    np.testing.assert_allclose(alpha_qe(E1, np.stack([DIAG, E2]), n=2, alpha=2.0), out, rtol=1e-6)
    assert out.dtype == np.float32 and out.shape == (2,)


def test_alpha_qe_clips_negative_similarity_and_handles_n():
    anti = np.array([-1.0, 1.0], dtype=np.float32) / np.sqrt(2.0)  # s = -1/sqrt2
    np.testing.assert_allclose(alpha_qe(E1, anti[None], n=1, alpha=3.0), E1, atol=1e-7)
    np.testing.assert_allclose(alpha_qe(E1, DIAG[None], n=0), E1)  # n = 0: the query
    # n beyond the available results uses all of them; alpha = 0 is average QE.
    out = alpha_qe(E1, E2[None], n=10, alpha=0.0)
    np.testing.assert_allclose(out, np.array([1, 1]) / np.sqrt(2), rtol=1e-6)


def test_alpha_qe_validation():
    with pytest.raises(ValueError, match="dimension"):
        alpha_qe(E1, np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match="n must"):
        alpha_qe(E1, DIAG[None], n=-1)
    with pytest.raises(ValueError, match="alpha"):
        alpha_qe(E1, DIAG[None], alpha=-1.0)
    with pytest.raises(ValueError, match="query"):
        alpha_qe(np.ones((1, 2), np.float32), DIAG[None])


def test_dba_by_hand():
    # Angles 0, 0.3, 1.2 rad; nearest other vector: 0->1, 1->0, 2->1 (cos 0.3, 0.3, 0.9).
    X = _circle([0.0, 0.3, 1.2])
    out = dba(X, k=1, alpha=1.0)
    expected = np.stack(
        [X[0] + np.cos(0.3) * X[1], X[1] + np.cos(0.3) * X[0], X[2] + np.cos(0.9) * X[1]]
    )
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert out.dtype == np.float32


def test_dba_edge_cases():
    X = _circle([0.0, 0.3, 1.2])
    np.testing.assert_allclose(dba(X, k=0), X, rtol=1e-6)
    np.testing.assert_allclose(dba(X[:1], k=5), X[:1], rtol=1e-6)
    # k beyond N - 1 uses every other vector; rows stay unit length.
    np.testing.assert_allclose(np.linalg.norm(dba(X, k=10), axis=1), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="k must"):
        dba(X, k=-2)
    with pytest.raises(ValueError, match="vectors"):
        dba(np.zeros((0, 4), np.float32))
