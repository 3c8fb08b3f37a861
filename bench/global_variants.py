"""Global descriptor variants on the ROxford subset: pooling × scales × whitening.

Extracts every variant in one pass per image (``GlobalExtractor.extract_all``), caches the
descriptors in ``--cache`` (an .npz outside the repo), then scores each variant with the
revisitop protocol. Whitening is learned on the database descriptors (the indexed
collection), as the serving path does with ``FitWhitening``.

    .venv/bin/python bench/global_variants.py [--max-side 1024] [--cache /tmp/loupe-global.npz]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import load_as_served, machine, require_roxford  # noqa: E402
from services.eval.ground_truth import load_ground_truth  # noqa: E402
from services.eval.revisitop import evaluate_protocols  # noqa: E402
from services.extractor.backbone import load_backbone  # noqa: E402
from services.extractor.global_descriptor import GlobalConfig, GlobalExtractor  # noqa: E402
from services.space.whitening import PCAWhitening  # noqa: E402


def extract_set(ext: GlobalExtractor, paths: list[str], boxes: list | None, max_side: int) -> tuple[dict[str, np.ndarray], float]:
    feats: dict[str, list[np.ndarray]] = {}
    t0 = time.perf_counter()
    for i, p in enumerate(paths):
        with open(p, "rb") as f:
            data = f.read()
        box = boxes[i] if boxes else None
        img = load_as_served(data, box, max_side)
        for k, v in ext.extract_all(img).items():
            if k != "regional":
                feats.setdefault(k, []).append(v)
        if (i + 1) % 100 == 0:
            print(f"  {i + 1}/{len(paths)} ({(i + 1) / (time.perf_counter() - t0):.2f} img/s)", file=sys.stderr, flush=True)
    return {k: np.stack(v) for k, v in feats.items()}, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-side", type=int, default=1024)
    ap.add_argument("--cache", default="/tmp/loupe-global-variants.npz")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = require_roxford()
    gt = load_ground_truth(root / "gnd_roxford5k_subset.pkl")
    img = lambda n: str(root / "jpg" / f"{n}.jpg")  # noqa: E731
    if os.path.exists(args.cache):
        z = np.load(args.cache)
        db = {k[3:]: z[k] for k in z.files if k.startswith("db:")}
        q = {k[2:]: z[k] for k in z.files if k.startswith("q:")}
        db_s = float(z["db_seconds"])
    else:
        ext = GlobalExtractor(load_backbone(), GlobalConfig(max_side=args.max_side))
        db, db_s = extract_set(ext, [img(n) for n in gt.imlist], None, args.max_side)
        q, _ = extract_set(ext, [img(n) for n in gt.qimlist], [g["bbx"] for g in gt.gnd], args.max_side)
        np.savez(args.cache, db_seconds=db_s, **{f"db:{k}": v for k, v in db.items()}, **{f"q:{k}": v for k, v in q.items()})
    rows = []
    for name in sorted(db):
        for whiten in (False, True):
            X, Q = db[name], q[name]
            if whiten:
                w = PCAWhitening()
                w.fit(X)
                X, Q = w.apply(X), w.apply(Q)
            ranks = np.argsort(-(X @ Q.T), axis=0)
            s = evaluate_protocols(ranks, gt)
            rows.append({"variant": name, "whiten": whiten, **{p: round(s[p]["map"], 2) for p in ("easy", "medium", "hard")}})
    print(f"machine: {machine()}; database {len(gt.imlist)} images extracted (all variants) at {len(gt.imlist) / db_s:.2f} img/s")
    print(f"{'variant':<10} {'whiten':<6} {'E':>6} {'M':>6} {'H':>6}")
    for r in rows:
        print(f"{r['variant']:<10} {str(r['whiten']):<6} {r['easy']:>6.2f} {r['medium']:>6.2f} {r['hard']:>6.2f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
