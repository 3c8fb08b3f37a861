"""Query boxes for held-out photos from geometric verification, in process (issue 27).

For each held-out photo (``bench/heldout.py``): its local features are extracted with the
served extractor settings (``ClusterConfig().extractor_config()``) and projected with the
collection's local PCA (``local_pca.npz`` of the data directory), then verified with the
broker's verification parameters (``BrokerConfig().verify``) against the stored local features
of every Medium positive of its landmark, read straight from the shard stores of a stopped
cluster's ``--data-dir`` (the reduced database indexed by ``loupe eval``). The inlier keypoints
of all verified pairs give the box (``bench.heldout.query_box``).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bench.heldout import Box, CropRule, HeldoutSplit, query_box
from services.common.local_candidates import CandidateLocal, dequantised, side_of, verify_local
from services.index.store import ShardStore
from services.rerank.verify import VerifyParams
from services.space.whitening import LocalPCA

if TYPE_CHECKING:
    from services.extractor.describer import Describer


@dataclass(frozen=True)
class PhotoBox:
    """One held-out photo's box and the evidence for it.

    Attributes
    ----------
    box : Box
        Query box in the photo's pixels.
    from_inliers : bool
        False when the fallback rule made it.
    width, height : int
        The photo's size in pixels.
    pairs : int
        Positives it was verified against.
    verified : int
        Pairs with at least ``VerifyParams.min_inliers`` inliers.
    points : int
        Inlier keypoints over the verified pairs.
    """

    box: Box
    from_inliers: bool
    width: int
    height: int
    pairs: int
    verified: int
    points: int


def stored_locals(data_dir: str, names: list[str]) -> dict[str, CandidateLocal]:
    """Stored local features of ``names`` from every shard store under ``data_dir`` (name →
    features; names no store holds are left out). The cluster must be stopped."""
    out: dict[str, CandidateLocal] = {}
    for path in sorted(glob.glob(os.path.join(data_dir, "shard-*"))):
        store = ShardStore(path)
        try:
            for name in names:
                img = store.get(name, regional=False, local=True)
                if img is not None and img.local is not None:
                    kp = img.local.keypoints.astype(np.float32)
                    out[name] = CandidateLocal(kp, dequantised(img.local.descriptors, img.local.scale), side_of(img.width, img.height))
        finally:
            store.close()
    return out


def photo_local(describer: "Describer", pca: LocalPCA, path: Path) -> tuple[np.ndarray, np.ndarray, int, int]:
    """``(keypoints (N, 4), PCA descriptors (N, 40), width, height)`` of the photo at ``path``,
    described as the extractor describes a database image."""
    from bench._common import load_as_served

    image = load_as_served(path.read_bytes(), None, describer.working_side)
    _, _, loc = describer.describe(image, want_local=True, want_regional=False)
    assert loc is not None  # want_local=True
    desc = pca.apply(np.asarray(loc.descriptors, dtype=np.float32)).astype(np.float32)
    return np.asarray(loc.keypoints, dtype=np.float32), desc, int(image.shape[1]), int(image.shape[0])


def inlier_points(query: tuple[np.ndarray, np.ndarray], candidates: list[CandidateLocal], params: VerifyParams) -> tuple[np.ndarray, int]:
    """``((M, 2) x, y of the query's inlier keypoints over its verified pairs, verified pairs)``."""
    points, verified = [], 0
    for c in candidates:
        r = verify_local(query, c, params)
        if r.inliers >= params.min_inliers:
            verified += 1
            points.append(query[0][r.inlier_pairs[:, 0], :2])
    return (np.concatenate(points) if points else np.zeros((0, 2), np.float32)), verified


def heldout_boxes(split: HeldoutSplit, data_dir: str, images: Path, rule: CropRule) -> dict[str, PhotoBox]:
    """A :class:`PhotoBox` for every held-out query of ``split`` (whose database ``data_dir`` holds)."""
    from cluster.config import ClusterConfig
    from services.broker.config import BrokerConfig
    from services.extractor.describer import Describer

    params = BrokerConfig().verify
    with open(os.path.join(data_dir, "local_pca.npz"), "rb") as f:
        pca = LocalPCA.from_bytes(f.read())
    describer = Describer(ClusterConfig().extractor_config())
    qindex = {q: i for i, q in enumerate(split.gt.qimlist)}
    positives = {q: [split.gt.imlist[i] for i in np.concatenate([split.gt.gnd[qindex[q]]["easy"], split.gt.gnd[qindex[q]]["hard"]]).tolist()]
                 for q in split.heldout}
    stored = stored_locals(data_dir, sorted({n for names in positives.values() for n in names}))
    out = {}
    for q in split.heldout:
        kp, desc, w, h = photo_local(describer, pca, images / f"{q}.jpg")
        cands = [stored[n] for n in positives[q] if n in stored]
        pts, verified = inlier_points((kp, desc), cands, params)
        box, from_inliers = query_box(pts, w, h, rule)
        out[q] = PhotoBox(box, from_inliers, w, h, len(cands), verified, len(pts))
    return out
