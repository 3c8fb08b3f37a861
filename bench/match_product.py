"""Per-pair verification cost, the matching product before/after, on real ROxford pairs.

The pairs of ``bench/verify_variants_roxford.py`` (each known query's served local features
against up to 30 of its positives and 60 random database images, as a shard stores them). Per
round (interleaved, so the machine's drift falls on both alike) every pair is matched both ways
— before: the product by ``cv2.gemm`` (the served matcher until this change), after: the served
``match_descriptors`` (numpy's BLAS) — and fitted with the served ``BrokerConfig().verify``;
reported: thread CPU per pair (one core: OpenCV, BLAS and faiss limited to one thread), the
median over rounds of the mean, and the number of pairs whose matches differ between the two
(which must be 0: the change may not move a match).

    env GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=4294967296 \\
        .venv/bin/python bench/match_product.py --data-dir D --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import machine  # noqa: E402
from bench.verify_variants_roxford import roxford_pairs  # noqa: E402
from services.broker.config import BrokerConfig  # noqa: E402
from services.common.threads import limit_numeric_threads  # noqa: E402
from services.rerank.verify import fit_matches, match_descriptors  # noqa: E402


def match_cv2_gemm(q: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Mutual nearest neighbours as ``match_descriptors`` computed them before: the similarity
    product by ``cv2.gemm`` (``(M, 2)`` int32, sorted by query index)."""
    sim = cv2.gemm(q, c, 1.0, None, 0.0, flags=cv2.GEMM_2_T)
    rows = np.arange(len(q))
    nn = sim.argmax(axis=1)
    keep = sim[rows, nn] >= sim.max(axis=0)[nn]
    kept = rows[keep]
    return np.stack([kept, nn[kept]], axis=1).astype(np.int32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="a stopped cluster's data directory (shard-*/, local_pca.npz)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    limit_numeric_threads(1)
    import torch

    torch.set_num_threads(1)
    pairs = roxford_pairs(args.data_dir)
    params = BrokerConfig().verify
    ways = {"before (cv2.gemm)": match_cv2_gemm, "after (numpy BLAS, served)": match_descriptors}
    load0 = os.getloadavg()[0]
    means: dict[str, dict[str, list[float]]] = {w: {"match": [], "fit": []} for w in ways}
    differ = 0
    for r in range(args.rounds + 1):  # round 0 warms up, not counted
        matches = {}
        for way, match in ways.items():
            t_match, t_fit, got = [], [], []
            for q_kp, q_desc, cand, side, _ in pairs:
                t0 = time.thread_time()
                m = match(q_desc, cand.descriptors)
                t1 = time.thread_time()
                fit_matches(q_kp, cand.keypoints, m, params, side)
                t_fit.append(time.thread_time() - t1)
                t_match.append(t1 - t0)
                got.append(m)
            if r:
                means[way]["match"].append(1e3 * float(np.mean(t_match)))
                means[way]["fit"].append(1e3 * float(np.mean(t_fit)))
            matches[way] = got
        before, after = matches.values()
        differ = max(differ, sum(not np.array_equal(a, b) for a, b in zip(before, after)))
    print(f"{machine()}; {len(pairs)} pairs, {args.rounds} rounds; load average {load0:.2f} → {os.getloadavg()[0]:.2f}")
    print("| matching | match ms / pair | fit ms / pair | total ms / pair |")
    print("|---|---:|---:|---:|")
    for way, m in means.items():
        a, b = statistics.median(m["match"]), statistics.median(m["fit"])
        print(f"| {way} | {a:.2f} | {b:.2f} | {a + b:.2f} |")
    print(f"pairs whose matches differ between the two: {differ} of {len(pairs)}")


if __name__ == "__main__":
    main()
