"""Learned whitening of the global descriptor, on cropped and whole-photo held-out queries (issue 27).

Two collection-level projections of the served R-MAC descriptor, each fitted on the collection
alone (no ground truth read), applied to the query, the stored database vectors and the stored
regional centroids, and scored global-only (``none``) and with regional matching
(``regional-match``: global + best regional similarity) by the protocol of
``bench/select_defaults.py``:

``pcaw-D``
    unsupervised PCA-whitening of the database vectors (what ``FitWhitening`` installs), the
    top ``D`` components (``all`` = every component; eigenvalues floored as served);
``lw-iM-sS-D``
    the *learned* whitening of Radenović et al. (``PCAWhitening.fit_pairs``, what
    ``FitWhitening`` installs when given pairs) from the collection's own geometrically verified
    pairs with >= ``M`` inliers (``bench/verified_components.py --pairs``, or ``loupe whiten
    --verified``): the within-pair differences whitened (covariance shrunk by ``S``), then
    rotated onto the principal directions of the whitened database, the top ``D`` kept.

The database vectors and regional centroids are read from the stopped cluster's ``--data-dir``
(what the shards serve); the queries are described as the extractor prepares a search
(``bench/crop_globals.py``'s ``served`` preparation, 512 px, 3 scales).

    .venv/bin/python bench/learned_whitening.py --set /tmp/loupe-sel --data-dir DATA_DIR --pairs pairs.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import load_as_served, machine, require_roxford  # noqa: E402
from bench.crop_globals import GLOBAL_SIDE, WORKING_SIDE, load_sets, per_query_aps, region_scores, stored_vectors  # noqa: E402
from bench.select_defaults import decide, summarise  # noqa: E402
from services.extractor.backbone import load_backbone  # noqa: E402
from services.extractor.global_descriptor import GlobalConfig, GlobalExtractor  # noqa: E402
from services.extractor.runtime import BackboneRunner  # noqa: E402
from services.space.whitening import PCAWhitening  # noqa: E402

BASELINE = "raw/none"


def read_pairs(path: str, names: list[str], min_inliers: int) -> np.ndarray:
    """``(P, 2)`` database indices of the verified pairs with ``>= min_inliers`` (each unordered pair once)."""
    index = {n: i for i, n in enumerate(names)}
    seen: set[tuple[int, int]] = set()
    with open(path) as f:
        for row in csv.DictReader(f):
            a, b = index.get(row["query"]), index.get(row["result"])
            if a is None or b is None or a == b or int(row["inliers"]) < min_inliers:
                continue
            seen.add((min(a, b), max(a, b)))
    return np.array(sorted(seen), dtype=np.int64).reshape(-1, 2)


def _l2n(x: np.ndarray) -> np.ndarray:
    return (x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-12)).astype(np.float32)


def describe_queries(gt, root, ext: GlobalExtractor) -> np.ndarray:
    """``(n_queries, D)`` served global descriptors of the (cropped) queries."""
    out = []
    for q, g in zip(gt.qimlist, gt.gnd):
        img = load_as_served((root / "jpg" / f"{q}.jpg").read_bytes(), g["bbx"], WORKING_SIDE)
        out.append(ext.extract(img).vector)
    return np.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", required=True, help="directory of select_defaults.py make-set / make-crops")
    ap.add_argument("--data-dir", required=True, help="data directory of the stopped cluster that indexed the set's gnd.json")
    ap.add_argument("--pairs", required=True, help="verified pairs CSV of bench/verified_components.py --pairs")
    ap.add_argument("--min-inliers", type=int, nargs="+", default=[16, 40])
    ap.add_argument("--shrink", type=float, nargs="+", default=[0.1, 0.3])
    ap.add_argument("--dims", type=int, nargs="+", default=[128, 256, 512, 0], help="kept components (0 = all)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--margin", type=float, default=2.0)
    ap.add_argument("--json", default=None, help="write every variant's per-query APs here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = require_roxford()
    split, sets = load_sets(args.set)
    names = sets["crop"].imlist
    db, regions = stored_vectors(args.data_dir, names)
    runner = BackboneRunner(load_backbone(fuse_bn=True), ["head"], "onnxruntime", threads=args.threads)
    ext = GlobalExtractor(runner, GlobalConfig(max_side=GLOBAL_SIDE))  # type: ignore[arg-type]

    projections: dict[str, tuple[np.ndarray, np.ndarray]] = {"raw": (np.zeros(db.shape[1]), np.eye(db.shape[1]))}
    for d in args.dims:
        w = PCAWhitening().fit(db, dim=d or None)
        projections[f"pcaw-{d or 'all'}"] = (w.mean, w.components * w.scale[:, None])
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f}; database {len(names)} images, D = {db.shape[1]}")
    for m in args.min_inliers:
        pairs = read_pairs(args.pairs, names, m)
        print(f"verified pairs with >= {m} inliers: {len(pairs)} over {len(np.unique(pairs))} images")
        for sh in args.shrink:
            for d in args.dims:
                w = PCAWhitening().fit_pairs(db, db[pairs[:, 0]], db[pairs[:, 1]], dim=d or None, shrinkage=sh)
                projections[f"lw-i{m}-s{sh}-{d or 'all'}"] = (w.mean, w.components * w.scale[:, None])

    dump = {}
    for set_name, gt in sets.items():
        q = describe_queries(gt, root, ext)
        runs = {}
        for name, (mean, p) in projections.items():
            f = (lambda x, mean=mean, p=p: _l2n((x - mean) @ p.T)) if name != "raw" else (lambda x: x)
            dq, qq = f(db), f(q)
            g = dq @ qq.T
            runs[f"{name}/none"] = per_query_aps(g, gt)
            runs[f"{name}/regional-match"] = per_query_aps(g + region_scores(qq, [f(r) for r in regions]), gt)
        dump[set_name] = runs
        print(f"\n## {set_name}: held-out queries as {'crops' if set_name == 'crop' else 'whole photos'} (Medium/Hard mAP)\n")
        summaries = {c: summarise(runs[c], split) for c in runs}
        keys = list(summaries[BASELINE])
        print("| projection / ranking | " + " | ".join(keys) + " |")
        print("|---|" + "---:|" * len(keys))
        for c in sorted(runs, key=lambda c: -summaries[c]["heldout.medium"]):
            print(f"| {c} | " + " | ".join(f"{summaries[c][k]:.1f}" for k in keys) + " |")
        for base in (BASELINE, "raw/regional-match"):
            print(f"\n### Decision rule against {base} (margin {args.margin}): the candidates that replace it\n")
            for c, v in decide(runs, split, base, args.margin):
                if v.startswith("REPLACES"):
                    print(f"- {c}: {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dump, f)


if __name__ == "__main__":
    main()
