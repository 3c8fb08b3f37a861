"""Per-pair verification cost on real ROxford pairs, and what cheaper variants change.

Reads the local features an indexed collection stores (the shard stores under ``--data-dir`` of
a stopped ``loupe eval``/``loupe up`` cluster, and its ``local_pca.npz``), extracts each known
ROxford query's local features as the extractor serves them (cropped to its box), and pairs it
with up to 30 of its positives and 60 random database images. For the served verification
(``VerifyParams(min_inliers=16)``, MAGSAC up to 1000 iterations) and each variant it reports the
thread CPU per pair (one core: matching, fitting) and which pairs verify (>= 16 inliers) — how
many positives, negatives, and pairs verified both ways.

    env GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=4294967296 OMP_NUM_THREADS=1 \\
        .venv/bin/python bench/verify_variants_roxford.py --data-dir loupe-data
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pickle
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import machine, require_roxford  # noqa: E402
from loupe.v1 import types_pb2  # noqa: E402
from services.common.images import decode_image  # noqa: E402
from services.common.local_candidates import side_of  # noqa: E402
from cluster.config import ClusterConfig  # noqa: E402
from services.extractor.describer import Describer, crop_and_resize  # noqa: E402
from services.index.servicer import stored_candidate  # noqa: E402
from services.index.store import ShardStore  # noqa: E402
from services.rerank.verify import VerifyParams, fit_matches, match_descriptors  # noqa: E402
from services.space.whitening import LocalPCA  # noqa: E402

SERVED = VerifyParams(min_inliers=16)
VARIANTS = {  # name: (query keypoints, candidate keypoints (the stored top by score), params)
    "served before (1000 iterations)": (None, None, SERVED),
    "500 iterations": (None, None, VerifyParams(min_inliers=16, max_iters=500)),
    "250 iterations": (None, None, VerifyParams(min_inliers=16, max_iters=250)),
    "classic RANSAC": (None, None, VerifyParams(min_inliers=16, estimator="ransac")),
    "100 most similar matches, 500 iterations": (None, None, VerifyParams(min_inliers=16, max_iters=500, max_matches=100)),
    "top-600 keypoints both sides, 500 iterations": (600, 600, VerifyParams(min_inliers=16, max_iters=500)),
    "top-500 keypoints both sides, 500 iterations": (500, 500, VerifyParams(min_inliers=16, max_iters=500)),
}


def roxford_pairs(data_dir: Path, positives: int = 30, random: int = 60) -> list[tuple]:
    """Each known ROxford query's local features (extracted as the extractor serves queries:
    cropped to its box) paired with up to ``positives`` of its positives and ``random`` random
    database images as a shard stores them: ``(query kp, query desc, candidate, side, positive)``."""
    root = require_roxford()
    gnd = pickle.load(open(root / "gnd_roxford5k_subset.pkl", "rb"))
    stores = [ShardStore(str(p)) for p in sorted(data_dir.glob("shard-*")) if (p / "data.mdb").exists()]
    pca = LocalPCA.from_bytes((data_dir / "local_pca.npz").read_bytes())
    describer = Describer(dataclasses.replace(ClusterConfig().extractor_config(), runtime="openvino", threads=1))  # the served settings
    rng = np.random.default_rng(0)

    def stored(image_id: str):
        for s in stores:
            img = s.get(image_id, regional=False, local=True)
            if img is not None:
                return stored_candidate(img), side_of(img.width, img.height)
        raise KeyError(image_id)

    pairs = []
    for name, g in zip(gnd["qimlist"], gnd["gnd"]):
        image = decode_image((root / "jpg" / f"{name}.jpg").read_bytes())
        x1, y1, x2, y2 = g["bbx"]
        image = crop_and_resize(image, types_pb2.Box(x1=x1, y1=y1, x2=x2, y2=y2), describer.working_side)
        loc = describer.describe(image, want_local=True, want_regional=False, query=True)[2]
        q_kp, q_desc = loc.keypoints.astype(np.float32), pca.apply(loc.descriptors.astype(np.float32)).astype(np.float32)
        pos = sorted(set(g["easy"]) | set(g["hard"]))
        for c in pos[:positives] + [int(i) for i in rng.choice(len(gnd["imlist"]), random, replace=False)]:
            cand, side = stored(gnd["imlist"][c])
            pairs.append((q_kp, q_desc, cand, side, c in pos))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="the cluster's data directory (shard-*/ stores, local_pca.npz)")
    parser.add_argument("--positives", type=int, default=30)
    parser.add_argument("--random", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    pairs = roxford_pairs(args.data_dir, args.positives, args.random)
    positive = np.array([p[4] for p in pairs])
    print(f"{machine()}; load average {os.getloadavg()[0]:.2f}; {len(pairs)} pairs ({int(positive.sum())} with a positive), "
          f"query keypoints {min(len(p[0]) for p in pairs)}..{max(len(p[0]) for p in pairs)}")
    reference = None
    for label, (nq, nc, params) in VARIANTS.items():
        inliers, t_match, t_fit = [], [], []
        for q_kp, q_desc, cand, side, _ in pairs:
            t0 = time.thread_time()
            m = match_descriptors(q_desc[:nq], cand.descriptors[:nc], max_matches=params.max_matches)
            t1 = time.thread_time()
            r = fit_matches(q_kp[:nq], cand.keypoints[:nc], m, params, side)
            t_fit.append(time.thread_time() - t1)
            t_match.append(t1 - t0)
            inliers.append(r.inliers)
        v = np.array(inliers) >= params.min_inliers
        if reference is None:
            reference = v
        print(f"{label}: match {1e3 * np.mean(t_match):.2f} + fit {1e3 * np.mean(t_fit):.2f} = {1e3 * (np.mean(t_match) + np.mean(t_fit)):.2f} "
              f"ms CPU per pair (mean); verified {int(v.sum())} (positives {int((v & positive).sum())}, negatives {int((v & ~positive).sum())}), "
              f"both this way and served {int((v & reference).sum())}")
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
