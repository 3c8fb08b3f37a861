"""A confirmation query set built from database images, for choosing defaults without tuning on
the test queries.

The known queries of a revisitop set are few (9 in the ROxford subset) and every default was
chosen on them. This module builds a second, differently made set from the same collection:

* each known query gets a **landmark**: the most common name prefix (``all_souls_000062`` →
  ``all_souls``, the generic ``oxford_`` prefix ignored) among its Medium positives, or its own
  prefix when it has none;
* from every landmark with at least ``min_positives`` Medium positives, ``fraction`` of its
  *easy* positives (at most ``max_per_landmark``, and at least one when it has ``min_easy`` easy
  positives; every k-th in name order, so the choice is deterministic and spread over the list)
  become **held-out queries**: whole database photos (the crop box is the full image);
* the held-out images are **removed from the database** (so neither a held-out query's own
  photo nor its duplicate in the kNN graph can help it), and every index is remapped;
* a held-out query's ground truth is its landmark's: an image is *easy* if it is easy for any of
  the landmark's known queries, else *hard* if hard for one of them; junk is the union of their
  junk lists.

The result is one revisitop ground truth whose ``qimlist`` holds the known queries first, then
the held-out ones, over the reduced database — one index serves both sets.

**Cropped held-out queries** (issue 27). Real ROxford queries are crops: a box around the
landmark, a fraction of the photo (median 0.28 of the image area over the 9 known queries). A
held-out photo's box is derived from geometric verification against its landmark's other
positives (``bench/heldout_crops.py`` verifies, in process, with the served local features and
verifier): the ``low``–``high`` percentile bounds of its inlier keypoints over all verified pairs
(:func:`box_from_inliers`), i.e. the part of the photo that other photos of the landmark also
show. A photo with fewer than ``CropRule.min_points`` inlier keypoints falls back to a box
centred in the photo with the photo's aspect and the known queries' median area fraction
(:func:`fallback_box`). :func:`with_boxes` puts the boxes in the ground truth's ``bbx``, so
``loupe eval`` crops held-out queries exactly as it crops the known ones.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from services.eval.ground_truth import GroundTruth

GENERIC_PREFIX = "oxford"

Box = tuple[float, float, float, float]
"""``(x1, y1, x2, y2)`` in original pixels, as a revisitop ``bbx``."""


@dataclass(frozen=True)
class HeldoutSplit:
    """A reduced collection with known and held-out queries.

    Attributes
    ----------
    gt : GroundTruth
        Database without the held-out images; ``qimlist`` = known queries, then held-out ones.
    known : list of str
        Names of the known queries (the original ``qimlist``).
    heldout : list of str
        Names of the held-out queries (database photos removed from ``gt.imlist``).
    landmark : dict of str to str
        Landmark of every query, known and held-out.
    """

    gt: GroundTruth
    known: list[str]
    heldout: list[str]
    landmark: dict[str, str]


def name_prefix(name: str) -> str:
    """``all_souls_000062`` → ``all_souls``."""
    return re.sub(r"_\d+$", "", name)


def query_landmarks(gt: GroundTruth) -> list[str]:
    """Landmark of each known query (see the module docstring), in ``gt.qimlist`` order."""
    out = []
    for qname, g in zip(gt.qimlist, gt.gnd):
        positives = np.concatenate([g["easy"], g["hard"]])
        votes = Counter(name_prefix(gt.imlist[i]) for i in positives)
        votes.pop(GENERIC_PREFIX, None)
        out.append(votes.most_common(1)[0][0] if votes else name_prefix(qname))
    return out


def heldout_split(
    gt: GroundTruth,
    image_size: Callable[[str], tuple[int, int]],
    *,
    min_positives: int = 10,
    fraction: float = 1 / 3,
    max_per_landmark: int = 8,
    min_easy: int | None = None,
) -> HeldoutSplit:
    """Build the confirmation set (module docstring) from ``gt``.

    Parameters
    ----------
    gt : GroundTruth
        The original collection and known queries.
    image_size : callable
        ``name -> (width, height)`` of a database image in pixels (the held-out query's box).
    min_positives, fraction, max_per_landmark
        Which landmarks give held-out queries, and how many.
    min_easy : int or None
        A landmark with at least this many easy positives gives one held-out query even when
        ``fraction`` of them rounds down to 0 (None: never).
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction: must be in (0, 1), got {fraction}")
    landmarks = query_landmarks(gt)
    by_landmark: dict[str, list[int]] = {}
    for qi, lm in enumerate(landmarks):
        by_landmark.setdefault(lm, []).append(qi)
    chosen: dict[str, list[int]] = {}
    for lm, qis in by_landmark.items():
        easy = sorted(set(np.concatenate([gt.gnd[q]["easy"] for q in qis]).tolist()))
        medium = set(easy) | set(np.concatenate([gt.gnd[q]["hard"] for q in qis]).tolist())
        if len(medium) < min_positives:
            continue
        n = int(len(easy) * fraction)
        if min_easy is not None and len(easy) >= min_easy:
            n = max(n, 1)
        n = min(max_per_landmark, n)
        if n > 0:
            step = len(easy) / n
            chosen[lm] = [easy[int(j * step)] for j in range(n)]
    removed = {i for ids in chosen.values() for i in ids}
    keep = [i for i in range(len(gt.imlist)) if i not in removed]
    new_index = {old: new for new, old in enumerate(keep)}

    def remap(ids: np.ndarray) -> np.ndarray:
        return np.asarray([new_index[i] for i in ids.tolist() if i in new_index], dtype=np.int64)

    qimlist = list(gt.qimlist)
    gnd = [{"bbx": g["bbx"], "easy": remap(g["easy"]), "hard": remap(g["hard"]), "junk": remap(g["junk"])} for g in gt.gnd]
    qlandmark = dict(zip(gt.qimlist, landmarks))
    heldout = []
    for lm, ids in chosen.items():
        qis = by_landmark[lm]
        easy = set(np.concatenate([gt.gnd[q]["easy"] for q in qis]).tolist())
        hard = set(np.concatenate([gt.gnd[q]["hard"] for q in qis]).tolist()) - easy
        junk = set(np.concatenate([gt.gnd[q]["junk"] for q in qis]).tolist()) - easy - hard
        as_array = lambda s: remap(np.asarray(sorted(s), dtype=np.int64))  # noqa: E731
        for i in ids:
            name = gt.imlist[i]
            w, h = image_size(name)
            qimlist.append(name)
            heldout.append(name)
            qlandmark[name] = lm
            gnd.append({"bbx": (0.0, 0.0, float(w), float(h)), "easy": as_array(easy), "hard": as_array(hard), "junk": as_array(junk)})
    reduced = GroundTruth(imlist=[gt.imlist[i] for i in keep], qimlist=qimlist, gnd=gnd)
    return HeldoutSplit(gt=reduced, known=list(gt.qimlist), heldout=heldout, landmark=qlandmark)


def to_json(gt: GroundTruth) -> dict:
    """The revisitop dict of ``gt`` with plain lists (what ``load_ground_truth`` reads as JSON)."""
    return {
        "imlist": gt.imlist,
        "qimlist": gt.qimlist,
        "gnd": [{"bbx": list(g["bbx"]), **{k: g[k].tolist() for k in ("easy", "hard", "junk")}} for g in gt.gnd],
    }


@dataclass(frozen=True)
class CropRule:
    """How a held-out photo's query box is made from its verified matches (module docstring).

    Attributes
    ----------
    low, high : float
        Percentiles (0-100) of the inlier keypoints' x and y that bound the box.
    min_points : int
        Fewer inlier keypoints (over all verified pairs) than this: the fallback box.
    min_side : float
        Smallest box side in pixels (a narrower box is widened about its centre, within the photo).
    fallback_area : float
        Area fraction of the fallback box, in (0, 1].
    """

    low: float = 5.0
    high: float = 95.0
    min_points: int = 30
    min_side: float = 64.0
    fallback_area: float = 0.28

    def __post_init__(self) -> None:
        if not 0 <= self.low < self.high <= 100:
            raise ValueError(f"low, high: need 0 <= low < high <= 100, got {self.low}, {self.high}")
        if not 0 < self.fallback_area <= 1:
            raise ValueError(f"fallback_area: must be in (0, 1], got {self.fallback_area}")


def _widen(lo: float, hi: float, side: float, limit: float) -> tuple[float, float]:
    """``[lo, hi]`` widened about its centre to at least ``side`` (at most ``limit``), kept in ``[0, limit]``."""
    side = min(side, limit)
    if hi - lo >= side:
        return lo, hi
    lo = min(max(0.0, (lo + hi - side) / 2), limit - side)
    return lo, lo + side


def box_from_inliers(points: np.ndarray, width: int, height: int, rule: CropRule = CropRule()) -> Box | None:
    """The query box of a photo from its inlier keypoints, or None when there are too few.

    ``points``: ``(N, 2)`` x, y of the photo's inlier keypoints over all its verified pairs
    (a keypoint matched in several pairs counts once per pair), in the photo's pixels.
    Returns the ``rule.low``–``rule.high`` percentile bounds, at least ``rule.min_side`` per
    side, clipped to the ``width`` × ``height`` photo.
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(pts) < rule.min_points:
        return None
    (x1, y1), (x2, y2) = np.percentile(pts, [rule.low, rule.high], axis=0)
    x1, x2 = _widen(max(0.0, float(x1)), min(float(width), float(x2)), rule.min_side, float(width))
    y1, y2 = _widen(max(0.0, float(y1)), min(float(height), float(y2)), rule.min_side, float(height))
    return (x1, y1, x2, y2)


def fallback_box(width: int, height: int, area: float) -> Box:
    """A box centred in the ``width`` × ``height`` photo, of its aspect, covering ``area`` of it."""
    s = float(np.sqrt(area))
    w, h = width * s, height * s
    return ((width - w) / 2, (height - h) / 2, (width + w) / 2, (height + h) / 2)


def query_box(points: np.ndarray, width: int, height: int, rule: CropRule = CropRule()) -> tuple[Box, bool]:
    """``(box, from_inliers)``: :func:`box_from_inliers`, else :func:`fallback_box` (False)."""
    box = box_from_inliers(points, width, height, rule)
    return (box, True) if box is not None else (fallback_box(width, height, rule.fallback_area), False)


def box_shape(box: Sequence[float], width: int, height: int) -> tuple[float, float]:
    """``(area fraction, aspect w/h)`` of ``box`` in a ``width`` × ``height`` photo (the box
    clipped to the photo first: some revisitop boxes overhang it)."""
    x1, y1 = max(0.0, box[0]), max(0.0, box[1])
    x2, y2 = min(float(width), box[2]), min(float(height), box[3])
    return (x2 - x1) * (y2 - y1) / (width * height), (x2 - x1) / (y2 - y1)


def with_boxes(split: HeldoutSplit, boxes: dict[str, Box]) -> HeldoutSplit:
    """``split`` with its held-out queries' ``bbx`` replaced by ``boxes`` (name → box); every
    held-out query needs one. Database, labels and known queries are unchanged."""
    missing = [q for q in split.heldout if q not in boxes]
    if missing:
        raise ValueError(f"boxes: no box for held-out queries {missing}")
    held = set(split.heldout)
    gnd = [{**g, "bbx": tuple(float(v) for v in boxes[q])} if q in held else g for q, g in zip(split.gt.qimlist, split.gt.gnd)]
    gt = GroundTruth(imlist=split.gt.imlist, qimlist=split.gt.qimlist, gnd=gnd)
    return HeldoutSplit(gt=gt, known=split.known, heldout=split.heldout, landmark=split.landmark)
