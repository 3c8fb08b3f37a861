"""Metric learning on the ROxford subset, honestly split: before/after mAP per loss.

Trains on the database images of landmarks that have no evaluated query (file names carry the
landmark), then describes the whole database and the cropped queries with the trained model
(GeM, 3 scales, 512 px, learned whitening — exactly what the extractor serves with --weights)
and scores them with the revisitop protocol, beside the untrained backbone in the same run.

    .venv/bin/python bench/train_roxford.py [--loss npair] [--steps 200] [--image-size 256]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import landmark, load_as_served, machine, require_roxford  # noqa: E402
from services.eval.ground_truth import load_ground_truth  # noqa: E402
from services.eval.revisitop import evaluate_protocols  # noqa: E402
from services.extractor.backbone import load_backbone  # noqa: E402
from services.extractor.global_descriptor import GlobalConfig, GlobalExtractor  # noqa: E402
from services.extractor.model_file import read_trained_head  # noqa: E402
from services.training.trainer import TrainConfig, train  # noqa: E402


def describe(weights: str | None, gt, root, side: int) -> tuple[np.ndarray, np.ndarray]:
    head = read_trained_head(weights) if weights else None
    cfg = GlobalConfig(pooling="gem", gem_p=head.gem_p if head else 3.0, max_side=side)
    ext = GlobalExtractor(load_backbone(weights, fuse_bn=True), cfg)

    def one(name: str, box=None) -> np.ndarray:
        img = load_as_served((root / "jpg" / f"{name}.jpg").read_bytes(), box, side)
        v = ext.extract(img).vector[None, :]
        return head.apply(v)[0] if head else v[0]

    db = np.stack([one(n) for n in gt.imlist])
    q = np.stack([one(n, g["bbx"]) for n, g in zip(gt.qimlist, gt.gnd)])
    return db, q


def score(db: np.ndarray, q: np.ndarray, gt) -> dict:
    s = evaluate_protocols(np.argsort(-(db @ q.T), axis=0), gt)
    return {p: round(s[p]["map"], 2) for p in ("easy", "medium", "hard")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loss", action="append", default=None)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--eval-side", type=int, default=512)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = require_roxford()
    gt = load_ground_truth(root / "gnd_roxford5k_subset.pkl")
    held_out = {landmark(q) for q in gt.qimlist}
    train_names = [n for n in gt.imlist if landmark(n) not in held_out]
    print(f"machine: {machine()}; training on {len(train_names)} images of "
          f"{len({landmark(n) for n in train_names})} landmarks, none of {sorted(held_out)}")
    t0 = time.perf_counter()
    print(f"untrained GeM: {score(*describe(None, gt, root, args.eval_side), gt)} ({time.perf_counter() - t0:.0f} s)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        labels = os.path.join(tmp, "labels.csv")
        with open(labels, "w") as f:
            f.write("image,label\n" + "".join(f"{n}.jpg,{landmark(n)}\n" for n in train_names))
        for loss in args.loss or ["npair"]:
            out = os.path.join(tmp, f"{loss}.pt")
            rep = train(TrainConfig(images_dir=str(root / "jpg"), labels_csv=labels, loss=loss, out_path=out, epochs=1,
                                    steps_per_epoch=args.steps, image_size=args.image_size, val_fraction=0.0, progress=False))
            print(f"{loss}: trained {rep.steps} steps at {rep.images_per_s:.1f} images/s ({rep.wall_s:.0f} s); "
                  f"after: {score(*describe(out, gt, root, args.eval_side), gt)}", flush=True)


if __name__ == "__main__":
    main()
