"""Per-image k-means reduction of regional vectors."""

from __future__ import annotations

import numpy as np
import pytest

from services.space.regions import reduce_regions


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_recovers_well_separated_groups_per_image() -> None:
    rng = np.random.default_rng(0)
    centres = _unit(rng.standard_normal((2, 3, 64)))  # 2 images x 3 true directions
    members = np.repeat(centres, 7, axis=1) + 0.05 * rng.standard_normal((2, 21, 64))
    out = reduce_regions(_unit(members).astype(np.float32), 3)
    assert out.shape == (2, 3, 64)
    np.testing.assert_allclose(np.linalg.norm(out, axis=2), 1.0, atol=1e-5)
    for b in range(2):
        sims = out[b] @ centres[b].T  # every true direction has a centroid close to it
        assert sims.max(axis=0).min() > 0.98


def test_few_regions_unchanged_and_bad_arguments() -> None:
    x = _unit(np.random.default_rng(1).standard_normal((4, 2, 8))).astype(np.float32)
    np.testing.assert_array_equal(reduce_regions(x, 5), x)
    with pytest.raises(ValueError, match="n >= 1"):
        reduce_regions(x, 0)
    with pytest.raises(ValueError, match="shape"):
        reduce_regions(x[0], 2)


def test_first_centroid_starts_from_the_whole_image_region() -> None:
    x = _unit(np.random.default_rng(2).standard_normal((3, 21, 16))).astype(np.float32)
    np.testing.assert_allclose(reduce_regions(x, 4, iterations=0)[:, 0], x[:, 0], atol=1e-6)

