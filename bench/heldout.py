"""A confirmation query set built from database images, for choosing defaults without tuning on
the test queries.

The known queries of a revisitop set are few (9 in the ROxford subset) and every default was
chosen on them. This module builds a second, differently made set from the same collection:

* each known query gets a **landmark**: the most common name prefix (``all_souls_000062`` →
  ``all_souls``, the generic ``oxford_`` prefix ignored) among its Medium positives, or its own
  prefix when it has none;
* from every landmark with at least ``min_positives`` Medium positives, ``fraction`` of its
  *easy* positives (at most ``max_per_landmark``; every k-th in name order, so the choice is
  deterministic and spread over the list) become **held-out queries**: whole database photos,
  not curated query crops (the crop box is the full image);
* the held-out images are **removed from the database** (so neither a held-out query's own
  photo nor its duplicate in the kNN graph can help it), and every index is remapped;
* a held-out query's ground truth is its landmark's: an image is *easy* if it is easy for any of
  the landmark's known queries, else *hard* if hard for one of them; junk is the union of their
  junk lists.

The result is one revisitop ground truth whose ``qimlist`` holds the known queries first, then
the held-out ones, over the reduced database — one index serves both sets.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np

from services.eval.ground_truth import GroundTruth

GENERIC_PREFIX = "oxford"


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
        n = min(max_per_landmark, int(len(easy) * fraction))
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
