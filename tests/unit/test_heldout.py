"""The confirmation query set built from database images (bench/heldout.py)."""

from __future__ import annotations

import numpy as np
import pytest

from services.eval.ground_truth import GroundTruth, parse_ground_truth
from bench.heldout import CropRule, box_from_inliers, box_shape, heldout_split, query_box, query_landmarks, to_json, with_boxes


def _gt() -> GroundTruth:
    # db: 12 "tower_*" images (0..11), 3 "bridge_*" (12..14), 3 generic "oxford_*" (15..17)
    imlist = [f"tower_{i:06d}" for i in range(12)] + [f"bridge_{i:06d}" for i in range(3)] + [f"oxford_{i:06d}" for i in range(3)]
    arr = lambda *v: np.asarray(v, dtype=np.int64)  # noqa: E731
    gnd = [
        {"bbx": (0.0, 0.0, 5.0, 5.0), "easy": arr(0, 1, 2, 3, 4, 5, 15), "hard": arr(6, 7, 8), "junk": arr(9)},  # query oxford_900 → tower
        {"bbx": (0.0, 0.0, 5.0, 5.0), "easy": arr(1, 2, 10), "hard": arr(11), "junk": arr()},  # tower again (union: 0..8, 10, 11, 15)
        {"bbx": (0.0, 0.0, 5.0, 5.0), "easy": arr(12, 13), "hard": arr(14), "junk": arr(16)},  # bridge: too few positives
        {"bbx": (0.0, 0.0, 5.0, 5.0), "easy": arr(), "hard": arr(), "junk": arr(17)},  # no positives: own prefix
    ]
    return GroundTruth(imlist=imlist, qimlist=["oxford_000900", "tower_000099", "bridge_000099", "castle_000001"], gnd=gnd)


def test_landmark_is_the_commonest_non_generic_prefix() -> None:
    assert query_landmarks(_gt()) == ["tower", "tower", "bridge", "castle"]


def test_split_holds_out_easy_positives_of_big_landmarks_only() -> None:
    gt = _gt()
    split = heldout_split(gt, lambda name: (640, 480), min_positives=10, fraction=1 / 3, max_per_landmark=8)
    # tower: easy union = {0,1,2,3,4,5,10,15} (8) → 2 held out, spread over the list; bridge has 3 positives → none
    assert split.heldout == ["tower_000000", "tower_000004"]
    assert all(split.landmark[q] == "tower" for q in split.heldout)
    assert not set(split.heldout) & set(split.gt.imlist), "held-out photos must leave the database"
    assert len(split.gt.imlist) == len(gt.imlist) - 2
    assert split.gt.qimlist == gt.qimlist + split.heldout
    parse_ground_truth(to_json(split.gt))  # a valid revisitop file


def test_indices_are_remapped_and_labels_follow_the_landmark() -> None:
    gt = _gt()
    split = heldout_split(gt, lambda name: (640, 480))
    new = split.gt
    for qi, g in enumerate(gt.gnd):  # known queries keep their labels, by name
        for key in ("easy", "hard", "junk"):
            kept = {gt.imlist[i] for i in g[key].tolist()} - set(split.heldout)
            assert {new.imlist[i] for i in new.gnd[qi][key].tolist()} == kept
    h = new.gnd[len(gt.qimlist)]  # first held-out query
    easy = {new.imlist[i] for i in h["easy"].tolist()}
    hard = {new.imlist[i] for i in h["hard"].tolist()}
    assert "tower_000010" in easy and "tower_000006" in hard and "tower_000011" in hard
    assert not easy & hard
    assert {new.imlist[i] for i in h["junk"].tolist()} == {"tower_000009"}
    assert h["bbx"] == (0.0, 0.0, 640.0, 480.0)


def test_bad_fraction_names_the_field() -> None:
    with pytest.raises(ValueError, match="fraction"):
        heldout_split(_gt(), lambda name: (1, 1), fraction=1.0)


def test_min_easy_gives_small_landmarks_one_query() -> None:
    gt = _gt()
    # bridge: 3 positives, 2 easy; a third of 2 rounds to 0, min_easy=2 makes it one
    split = heldout_split(gt, lambda name: (640, 480), min_positives=3, min_easy=2)
    assert [split.landmark[q] for q in split.heldout].count("bridge") == 1
    assert "bridge_000012" not in split.heldout  # names are bridge_000000.. (db indices 12..14)
    assert split.heldout[-1] == "bridge_000000"
    without = heldout_split(gt, lambda name: (640, 480), min_positives=3)
    assert "bridge" not in {without.landmark[q] for q in without.heldout}


def test_box_from_inliers_is_the_percentile_bounds() -> None:
    rng = np.random.default_rng(0)
    core = np.column_stack([rng.uniform(200, 400, 400), rng.uniform(100, 300, 400)])
    stray = np.array([[5.0, 5.0], [630.0, 470.0]])  # two chance matches far out: ignored
    box = box_from_inliers(np.vstack([core, stray]), 640, 480, CropRule(low=5, high=95, min_points=30))
    assert box is not None
    x1, y1, x2, y2 = box
    assert 200 <= x1 < 220 and 380 < x2 <= 400 and 100 <= y1 < 120 and 280 < y2 <= 300  # ~5th/95th of U(200, 400), U(100, 300)


def test_box_from_inliers_widens_small_boxes_inside_the_photo() -> None:
    pts = np.array([[630.0, 10.0]] * 40)  # all on one spot near the top-right corner
    box = box_from_inliers(pts, 640, 480, CropRule(min_side=64))
    assert box == (576.0, 0.0, 640.0, 64.0)


def test_too_few_inliers_fall_back_to_a_centred_box() -> None:
    rule = CropRule(min_points=30, fallback_area=0.25)
    assert box_from_inliers(np.zeros((29, 2)), 640, 480, rule) is None
    box, from_inliers = query_box(np.zeros((29, 2)), 640, 480, rule)
    assert not from_inliers
    assert box == (160.0, 120.0, 480.0, 360.0)
    area, aspect = box_shape(box, 640, 480)
    assert area == pytest.approx(0.25) and aspect == pytest.approx(640 / 480)
    _, from_inliers = query_box(np.full((30, 2), 100.0), 640, 480, rule)
    assert from_inliers


def test_box_shape_clips_overhanging_boxes() -> None:
    assert box_shape((-10.0, 0.0, 330.0, 480.0), 640, 480) == pytest.approx((0.515625, 330 / 480))


def test_with_boxes_sets_only_the_heldout_bbx() -> None:
    gt = _gt()
    split = heldout_split(gt, lambda name: (640, 480))
    boxes = {q: (10.0, 20.0, 110.0, 220.0) for q in split.heldout}
    cropped = with_boxes(split, boxes)
    assert cropped.gt.imlist == split.gt.imlist and cropped.gt.qimlist == split.gt.qimlist
    for q, g, g0 in zip(cropped.gt.qimlist, cropped.gt.gnd, split.gt.gnd):
        assert g["bbx"] == (boxes[q] if q in boxes else g0["bbx"])
        for key in ("easy", "hard", "junk"):
            assert np.array_equal(g[key], g0[key])
    parsed = parse_ground_truth(to_json(cropped.gt))
    assert parsed.gnd[-1]["bbx"] == (10.0, 20.0, 110.0, 220.0)
    with pytest.raises(ValueError, match="boxes"):
        with_boxes(split, {})


def test_crop_rule_checks_its_fields() -> None:
    with pytest.raises(ValueError, match="low, high"):
        CropRule(low=50, high=40)
    with pytest.raises(ValueError, match="fallback_area"):
        CropRule(fallback_area=0.0)
