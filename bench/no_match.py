"""No-match rejection: false-accept rate of the verification confidence, beside the recall it keeps.

Against a cluster that already holds the ROxford subset (``loupe up`` + ``loupe eval`` or
``loupe index``), searches with verification:
  * negatives: photos with no true match in the collection (scikit-image's bundled photos and
    the phototourism sample: London, Venice, Washington landmarks), where any
    ``query_confidence >= threshold`` is a false accept;
  * positives: the ROxford queries (cropped to their bbx) that have a Medium positive, where
    an accept counts only when the top result is a true positive.

    .venv/bin/python bench/no_match.py --address 127.0.0.1:50051 [--threshold 0.5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import SHARED_DATA, require_roxford  # noqa: E402
from cluster.demo import PHOTOS, encode_jpeg, load_photo  # noqa: E402
from loupe.client import RetrievalClient  # noqa: E402
from loupe.rerank_spec import parse_rerank  # noqa: E402
from services.eval.ground_truth import load_ground_truth  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--address", required=True)
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--rerank", default="verify")
    args = ap.parse_args()
    root = require_roxford()
    gt = load_ground_truth(root / "gnd_roxford5k_subset.pkl")
    opts = parse_rerank(args.rerank)
    negatives = [(f"skimage/{p}", encode_jpeg(load_photo(p))) for p in PHOTOS]
    pt = SHARED_DATA / "phototourism_sample" / "jpg"
    if pt.is_dir():
        negatives += [(f"phototourism/{f}", (pt / f).read_bytes()) for f in sorted(os.listdir(pt))]
    rows = []
    with RetrievalClient(args.address) as client:
        for name, data in negatives:
            r = client.search(image=data, k=5, rerank=opts, timeout_s=120)
            rows.append({"query": name, "kind": "negative", "confidence": r.query_confidence,
                         "top_inliers": r.results[0].stages.inliers if r.results else 0})
        for qi, qname in enumerate(gt.qimlist):
            g = gt.gnd[qi]
            positives = set(np.concatenate([g["easy"], g["hard"]]).tolist())
            if not positives:
                continue
            data = (root / "jpg" / f"{qname}.jpg").read_bytes()
            r = client.search(image=data, k=5, crop=g["bbx"], rerank=opts, timeout_s=120)
            top = gt.imlist.index(r.results[0].id) if r.results and r.results[0].id in gt.imlist else -1
            rows.append({"query": qname, "kind": "positive", "confidence": r.query_confidence,
                         "top_is_positive": top in positives, "top_inliers": r.results[0].stages.inliers if r.results else 0})
    neg = [r for r in rows if r["kind"] == "negative"]
    pos = [r for r in rows if r["kind"] == "positive"]
    fa = sum(r["confidence"] >= args.threshold for r in neg)
    kept = sum(r["confidence"] >= args.threshold and r["top_is_positive"] for r in pos)
    print(f"threshold {args.threshold}: false accepts {fa}/{len(neg)} ({100 * fa / max(1, len(neg)):.1f}%), "
          f"true accepts kept {kept}/{len(pos)} ({100 * kept / max(1, len(pos)):.1f}%)")
    print(f"negative max inliers {max(r['top_inliers'] for r in neg)}, positive top inliers {sorted(r['top_inliers'] for r in pos)}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
