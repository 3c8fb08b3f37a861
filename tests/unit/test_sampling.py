"""Samplers (N-pair batches, positives, hard-negative mining, hold-out) and instance-mode views."""

from __future__ import annotations


import numpy as np
import pytest

from services.training.augment import (
    LIGHT,
    STRONG,
    augment,
    color_jitter,
    random_perspective,
    random_resized_crop,
    resize_max_side,
)
from services.training.sampling import (
    encode_labels,
    holdout_split,
    mine_hard_negatives,
    sample_npair,
    sample_positives,
)

LABELS = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])  # class 3 is a singleton


def test_encode_labels_in_order_of_appearance() -> None:
    assert encode_labels(["b", "a", "b", "c"]).tolist() == [0, 1, 0, 2]


def test_holdout_split_keeps_two_per_class_for_training() -> None:
    labels = np.repeat(np.arange(5), [2, 3, 4, 6, 10])
    train, val = holdout_split(labels, 0.5, np.random.default_rng(0))
    assert np.intersect1d(train, val).size == 0
    assert np.union1d(train, val).tolist() == list(range(len(labels)))
    assert np.bincount(labels[train], minlength=5).min() >= 2
    # round(0.5 n) capped at n - 2
    assert np.bincount(labels[val], minlength=5).tolist() == [0, 1, 2, 3, 5]
    again = holdout_split(labels, 0.5, np.random.default_rng(0))
    assert train.tolist() == again[0].tolist() and val.tolist() == again[1].tolist()


def test_holdout_split_instance_mode_holds_out_whole_images() -> None:
    labels = np.arange(200)
    train, val = holdout_split(labels, 0.25, np.random.default_rng(1))
    assert 30 <= len(val) <= 70
    assert len(train) + len(val) == 200
    with pytest.raises(ValueError):
        holdout_split(labels, 1.0, np.random.default_rng(1))


def test_sample_npair_distinct_classes_and_pairs() -> None:
    rng = np.random.default_rng(2)
    for _ in range(50):
        batch = sample_npair(LABELS, 4, rng)
        assert batch.shape == (4, 2)
        assert len(set(LABELS[batch[:, 0]].tolist())) == 4
        assert (LABELS[batch[:, 0]] == LABELS[batch[:, 1]]).all()
        for a, p in batch:
            assert a != p or LABELS[a] == 3  # the same image only for the singleton class
    with pytest.raises(ValueError):
        sample_npair(LABELS, 5, rng)
    with pytest.raises(ValueError):
        sample_npair(LABELS, 1, rng)


def test_sample_npair_is_seeded() -> None:
    a = sample_npair(LABELS, 3, np.random.default_rng(7))
    b = sample_npair(LABELS, 3, np.random.default_rng(7))
    assert a.tolist() == b.tolist()


def test_sample_positives() -> None:
    queries = np.arange(len(LABELS))
    pos = sample_positives(LABELS, queries, np.random.default_rng(3))
    assert (LABELS[pos] == LABELS[queries]).all()
    assert (pos != queries).sum() == len(LABELS) - 1
    assert pos[9] == 9  # singleton: itself (two augmentations make the pair)


def test_mine_hard_negatives_by_hand() -> None:
    angles = np.deg2rad([0, 10, 20, 30, 40, 90])
    pool = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    pool_labels = np.array([0, 1, 1, 2, 3, 4])
    query = pool[:1] + [0.0, 0.01]
    # ranking from the query: 0 (own class, skipped), 1, 2 (class 1 again, skipped), 3, 4, 5
    assert mine_hard_negatives(query, np.array([0]), pool, pool_labels, 3).tolist() == [[1, 3, 4]]
    # a query of class 2 skips pool image 3 too
    assert mine_hard_negatives(query, np.array([2]), pool, pool_labels, 3).tolist() == [[0, 1, 4]]
    with pytest.raises(ValueError, match="classes"):
        mine_hard_negatives(query, np.array([0]), pool, pool_labels, 5)


def test_mine_hard_negatives_follows_the_descriptors() -> None:
    rng = np.random.default_rng(4)
    pool = rng.standard_normal((50, 8))
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    labels = np.arange(50)
    neg = mine_hard_negatives(pool[:5], labels[:5], pool, labels, 3)
    sims = pool[:5] @ pool.T
    for q in range(5):
        s = sims[q].copy()
        s[q] = -np.inf
        assert neg[q].tolist() == np.argsort(-s)[:3].tolist()


# -- instance-mode views --------------------------------------------------------------------


def _image(h: int = 90, w: int = 120) -> np.ndarray:
    rng = np.random.default_rng(5)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("config", [STRONG, LIGHT])
def test_augment_shape_and_seed(config: object) -> None:
    img = _image()
    a = augment(img, 64, np.random.default_rng(6), config)
    b = augment(img, 64, np.random.default_rng(6), config)
    c = augment(img, 64, np.random.default_rng(7), config)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_full_crop_is_a_plain_resize() -> None:
    img = _image(60, 60)
    out = random_resized_crop(img, 60, np.random.default_rng(0), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert np.array_equal(out, img)


def test_identity_perspective_and_jitter() -> None:
    img = _image()
    rng = np.random.default_rng(0)
    assert np.abs(random_perspective(img, 0.0, rng).astype(int) - img).max() <= 1
    same = color_jitter(img, rng, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    assert np.array_equal(same, img)


def test_perspective_moves_corners_inwards() -> None:
    img = np.full((80, 80, 3), 255, dtype=np.uint8)
    out = random_perspective(img, 0.5, np.random.default_rng(1))
    assert out[40, 40].tolist() == [255, 255, 255]
    assert (out[[0, 0, -1, -1], [0, -1, 0, -1]] == 0).all()  # corners now outside: black


def test_resize_max_side_keeps_aspect() -> None:
    assert resize_max_side(_image(90, 120), 60).shape == (45, 60, 3)
    assert resize_max_side(_image(120, 90), 240).shape == (240, 180, 3)
