"""Global descriptor variants on the ROxford subset: pooling × scales × resolution × whitening
(plain, shrunk, reduced), and query-time flips.

Extracts every pooling variant in one pass per image (``extract_all`` below; with
``--flip`` also of the mirrored image, averaged), caches the descriptors in ``--cache`` (an .npz
outside the repo), then scores each variant with the revisitop protocol. Whitening is learned
on the database descriptors (the indexed collection), as the serving path does with
``FitWhitening``. With ``--gnd``/``--split`` from ``bench/select_defaults.py make-set`` it
scores the known and the held-out queries separately (the selection protocol of issue 15).

    .venv/bin/python bench/global_variants.py [--max-side 1024] [--cache /tmp/loupe-global.npz]
    .venv/bin/python bench/global_variants.py --max-side 512 --gnd /tmp/loupe-sel/gnd.json \
        --split /tmp/loupe-sel/split.json --cache /tmp/loupe-sel/global-512.npz
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
from services.extractor.runtime import RUNTIMES, BackboneRunner  # noqa: E402
from services.space.whitening import PCAWhitening  # noqa: E402
from bench.select_defaults import summarise  # noqa: E402
from services.extractor.global_descriptor import POOLINGS  # noqa: E402
from services.extractor.pooling import l2n  # noqa: E402
from services.extractor.pooling import regional_vectors  # noqa: E402


@torch.inference_mode()
def extract_all(ext: GlobalExtractor, image: np.ndarray) -> dict[str, np.ndarray]:
    """Every pooling, single- and multi-scale, from one pass over ``ext``'s scales.

    ``image``: ``(H, W, 3)`` uint8 RGB. Returns ``"{pooling}-ss"`` (largest scale only) and
    ``"{pooling}-ms"`` (all scales) for each pooling in ``POOLINGS``, each ``(D,)`` float32
    L2-normalised, plus ``"regional"`` ``(R, D)``.
    """
    per_scale: dict[str, list[torch.Tensor]] = {name: [] for name in POOLINGS}
    out: dict[str, np.ndarray] = {}
    for is_largest, fmap in ext._feature_maps(image):
        for name in POOLINGS:
            per_scale[name].append(l2n(ext._pool_fn(name)(fmap)))
            if is_largest:
                out[f"{name}-ss"] = per_scale[name][-1][0].numpy().astype(np.float32)
        if is_largest:
            out["regional"] = regional_vectors(fmap, ext.config.rmac_levels)[0].numpy().astype(np.float32)
    for name in POOLINGS:
        out[f"{name}-ms"] = ext._aggregate(name, torch.cat(per_scale[name])).numpy().astype(np.float32)
    return out


def extract_set(ext: GlobalExtractor, paths: list[str], boxes: list | None, max_side: int, flip: bool = False) -> tuple[dict[str, np.ndarray], float]:
    feats: dict[str, list[np.ndarray]] = {}
    t0 = time.perf_counter()
    for i, p in enumerate(paths):
        with open(p, "rb") as f:
            data = f.read()
        box = boxes[i] if boxes else None
        img = load_as_served(data, box, max_side)
        for k, v in extract_all(ext, img).items():
            if k != "regional":
                feats.setdefault(k, []).append(v)
        if flip:
            for k, v in extract_all(ext, np.ascontiguousarray(img[:, ::-1])).items():
                if k != "regional":
                    both = feats[k][-1] + v
                    feats.setdefault(f"{k}+flip", []).append(both / np.linalg.norm(both))
        if (i + 1) % 100 == 0:
            print(f"  {i + 1}/{len(paths)} ({(i + 1) / (time.perf_counter() - t0):.2f} img/s)", file=sys.stderr, flush=True)
    return {k: np.stack(v) for k, v in feats.items()}, time.perf_counter() - t0


WHITENINGS = {"none": None, "pcaw": {}, "pcaw-shrink0.5": {"shrinkage": 0.5}, "pcaw-shrink0.9": {"shrinkage": 0.9},
              "pcaw-256": {"dim": 256}, "pcaw-256-shrink0.5": {"dim": 256, "shrinkage": 0.5}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-side", type=int, default=1024)
    ap.add_argument("--cache", default="/tmp/loupe-global-variants.npz")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--gnd", default=None, help="revisitop ground truth (default: the subset's own)")
    ap.add_argument("--split", default=None, help="split.json of select_defaults.py make-set: score known and held-out queries apart")
    ap.add_argument("--flip", action="store_true", help="also extract the mirrored image (variants '+flip': the two averaged)")
    ap.add_argument("--whitening", default="none,pcaw", help=f"comma-separated, of {','.join(WHITENINGS)}")
    ap.add_argument("--runtime", default="openvino", choices=RUNTIMES, help="backbone runtime (descriptors match eager torch)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = require_roxford()
    gt = load_ground_truth(args.gnd or root / "gnd_roxford5k_subset.pkl")
    img = lambda n: str(root / "jpg" / f"{n}.jpg")  # noqa: E731
    if os.path.exists(args.cache):
        z = np.load(args.cache)
        db = {k[3:]: z[k] for k in z.files if k.startswith("db:")}
        q = {k[2:]: z[k] for k in z.files if k.startswith("q:")}
        db_s = float(z["db_seconds"])
    else:
        model = load_backbone(fuse_bn=True)
        backbone = BackboneRunner(model, ["head"], args.runtime, threads=args.threads) if args.runtime != "torch" else model
        ext = GlobalExtractor(backbone, GlobalConfig(max_side=args.max_side))  # type: ignore[arg-type]
        db, db_s = extract_set(ext, [img(n) for n in gt.imlist], None, args.max_side, args.flip)
        q, _ = extract_set(ext, [img(n) for n in gt.qimlist], [g["bbx"] for g in gt.gnd], args.max_side, args.flip)
        np.savez(args.cache, db_seconds=db_s, **{f"db:{k}": v for k, v in db.items()}, **{f"q:{k}": v for k, v in q.items()})
    split = None
    if args.split:
        with open(args.split) as f:
            split = json.load(f)
    rows = []
    for name in sorted(db):
        for wname in args.whitening.split(","):
            X, Q = db[name], q[name]
            if WHITENINGS[wname] is not None:
                w = PCAWhitening()
                w.fit(X, **WHITENINGS[wname])
                X, Q = w.apply(X), w.apply(Q)
            ranks = np.argsort(-(X @ Q.T), axis=0)
            s = evaluate_protocols(ranks, gt)
            row = {"variant": name, "whiten": wname, **{p: round(s[p]["map"], 2) for p in ("easy", "medium", "hard")}}
            if split:
                aps = {qn: {p: s[p]["aps"][i] for p in ("medium", "hard")} for i, qn in enumerate(gt.qimlist)}
                row.update({k: round(v, 2) for k, v in summarise(aps, split).items()})
            rows.append(row)
    print(f"machine: {machine()}; database {len(gt.imlist)} images extracted (all variants) at {len(gt.imlist) / db_s:.2f} img/s")
    keys = [k for k in rows[0] if k not in ("variant", "whiten")]
    print("| variant | whitening | " + " | ".join(keys) + " |")
    print("|---|---|" + "---:|" * len(keys))
    for r in rows:
        print(f"| {r['variant']} | {r['whiten']} | " + " | ".join(f"{r[k]:.1f}" for k in keys) + " |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
