"""The confirmation query set built from database images (bench/heldout.py)."""

from __future__ import annotations

import numpy as np
import pytest

from services.eval.ground_truth import GroundTruth, parse_ground_truth
from bench.heldout import heldout_split, query_landmarks, to_json


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
