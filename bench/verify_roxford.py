"""Geometric verification on the ROxford subset: L2-norm vs trained-attention keypoints vs a
classical RootSIFT peer, on the same global candidates, at V = 100, 200, 400.

1. Global candidates: the served descriptor (R-MAC, 3 scales, 512 px) ranks the database for
   each cropped query (``--global-cache``: reuse the ``global`` array that
   ``bench/diffusion_roxford.py --cache`` writes).
2. Attention: ``train_attention`` (backbone frozen, image-level labels) on the database images
   of the landmarks that have no evaluated query (file names carry the landmark), 20 % of
   them held out for validation accuracy. No image of an evaluated landmark is trained on.
3. Local features of every database image and query at 1024 px, pyramid (0.25, 0.5, 1), top
   1000 keypoints, scored by feature L2 norm and by the trained head from one backbone pass;
   PCA-40 learned on the first 200 database images (as the broker learns it on the first
   indexed batch), int8 storage round trip (as the shards keep them). RootSIFT: OpenCV SIFT,
   1000 features, ratio test 0.8.
4. Verification exactly as the broker does it (MNN for loupe, ratio test for RootSIFT,
   USAC-MAGSAC affine, plausibility, verified first by inliers then global score): mAP
   Easy/Medium/Hard per method and V, ms per pair (median, p99, thread CPU), the stage's wall
   time at V=100 through a 2-thread pool; extraction images/s and bytes per image beside the
   global-only descriptor, in the same run.

Verification uses the broker's own parameters (``BrokerConfig().verify``: min_inliers 16);
``--min-inliers`` adds other thresholds. ``--cache`` keeps the extracted local features.

    env GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=4294967296 \\
        .venv/bin/python bench/verify_roxford.py [--global-cache /tmp/roxford_regions.npz] \\
        [--save-head head.pt | --head head.pt] [--cache /tmp/local.npz] [--max-v 400]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import landmark, load_as_served, machine, require_roxford  # noqa: E402
from services.common.images import decode_image  # noqa: E402
from services.eval.ground_truth import load_ground_truth  # noqa: E402
from services.eval.revisitop import evaluate_protocols  # noqa: E402
from services.broker.config import BrokerConfig  # noqa: E402
from services.extractor.attention import (  # noqa: E402
    AttentionHead,
    AttentionTrainConfig,
    load_attention,
    save_attention,
    train_attention,
)
from services.extractor.backbone import EfficientNetLite0, load_backbone  # noqa: E402
from services.extractor.global_descriptor import GlobalConfig, GlobalExtractor  # noqa: E402
from services.extractor.local_features import LocalConfig, LocalExtractor  # noqa: E402
from services.space.whitening import LocalPCA  # noqa: E402
from services.index.store import LocalStore  # noqa: E402
from bench.rootsift import ROOTSIFT_RATIO, extract_rootsift  # noqa: E402
from services.rerank.verify import rerank_by_inliers, verify_pair  # noqa: E402

WORKING_SIDE = 1024
PCA_IMAGES = 200
VS = (100, 200, 400)


class SharedTaps:
    """Backbone stand-in that memoises the last few ``forward_taps`` calls, so two
    LocalExtractors (L2-norm and attention scoring) share one backbone pass per pyramid level."""

    def __init__(self, backbone: EfficientNetLite0, keep: int = 4) -> None:
        self.backbone = backbone
        self.keep = keep
        self._memo: list[tuple[torch.Tensor, tuple[str, ...], dict]] = []

    def forward_taps(self, x: torch.Tensor, taps):
        key = tuple(taps)
        for mx, mkey, out in self._memo:
            if mkey == key and mx.shape == x.shape and torch.equal(mx, x):
                return out
        out = self.backbone.forward_taps(x, taps)
        self._memo = (self._memo + [(x, key, out)])[-self.keep :]
        return out


def dequantized(stored: LocalStore) -> tuple[np.ndarray, np.ndarray]:
    """(N, 4) float32 keypoints and (N, C) float32 descriptors of a stored feature set."""
    return stored.keypoints.astype(np.float32), stored.descriptors.astype(np.float32) * stored.scale


def load(root, name: str, box) -> np.ndarray:
    return load_as_served((root / "jpg" / f"{name}.jpg").read_bytes(), box, WORKING_SIDE)


def stats_ms(seconds: list[float]) -> str:
    ms = np.asarray(seconds) * 1e3
    return f"median {np.median(ms):.2f} ms, p99 {np.percentile(ms, 99):.2f} ms"


def train_head(backbone: EfficientNetLite0, root, gt, held_out: set[str], epochs: int) -> AttentionHead:
    """Attention head trained on the database images of landmarks without an evaluated query."""
    train_names = [n for n in gt.imlist if landmark(n) not in held_out]
    classes = sorted({landmark(n) for n in train_names})
    val_mask = np.random.default_rng(0).random(len(train_names)) < 0.2
    imgs = [decode_image((root / "jpg" / f"{n}.jpg").read_bytes(), max_side=512) for n in train_names]
    labels = [classes.index(landmark(n)) for n in train_names]
    torch.manual_seed(0)
    head = AttentionHead(EfficientNetLite0.tap_spec(LocalConfig().layer)[0])
    t0 = time.perf_counter()
    hist = train_attention(
        backbone, head,
        [im for im, v in zip(imgs, val_mask) if not v], [y for y, v in zip(labels, val_mask) if not v],
        AttentionTrainConfig(layer=LocalConfig().layer, epochs=epochs),
        val_images=[im for im, v in zip(imgs, val_mask) if v], val_labels=[y for y, v in zip(labels, val_mask) if v],
    )
    print(f"attention: trained on {int((~val_mask).sum())} images of {len(classes)} landmarks {classes} "
          f"(none of {sorted(held_out)}), {int(val_mask.sum())} held out; {epochs} epochs in "
          f"{time.perf_counter() - t0:.0f} s; train acc {hist.train_accuracy[-1]:.3f}, val acc {hist.val_accuracy[-1]:.3f}", flush=True)
    return head


def extract_local(root, items, wanted: list[int], head: AttentionHead, backbone: EfficientNetLite0) -> dict:
    """Local features (L2-norm and attention scoring from one pass, RootSIFT) of ``items[wanted]``,
    plus the extraction speed of each way on the first 50, beside the global descriptor alone."""
    shared = SharedTaps(backbone)
    l2 = LocalExtractor(shared, LocalConfig())  # type: ignore[arg-type]
    att = LocalExtractor(shared, LocalConfig(score="attention"), head)  # type: ignore[arg-type]
    gext = GlobalExtractor(backbone, GlobalConfig(pooling="rmac", max_side=512))
    out: dict = {"l2norm": {}, "attention": {}, "rootsift": {}, "side": {}}
    timing = {"global-only": 0.0, "local (both scorings)": 0.0, "rootsift": 0.0}
    t_start = time.perf_counter()
    for n, i in enumerate(wanted):
        name, box = items[i]
        img = load(root, name, box)
        out["side"][i] = float(max(img.shape[:2]))
        timed = n < 50
        t = time.perf_counter()
        if timed:
            gext.extract(img)
            timing["global-only"] += time.perf_counter() - t
        t = time.perf_counter()
        out["l2norm"][i], out["attention"][i] = l2.extract(img), att.extract(img)
        if timed:
            timing["local (both scorings)"] += time.perf_counter() - t
        t = time.perf_counter()
        out["rootsift"][i] = extract_rootsift(img)
        if timed:
            timing["rootsift"] += time.perf_counter() - t
        if (n + 1) % 100 == 0:
            print(f"  local features {n + 1}/{len(wanted)} ({(n + 1) / (time.perf_counter() - t_start):.2f} images/s)", flush=True)
    n_timed = min(50, len(wanted))
    print(f"extraction on {n_timed} images at 1024 px: " + ", ".join(f"{k} {n_timed / v:.2f} images/s" for k, v in timing.items())
          + " (local = one pyramid pass, two scorings)")
    return out


def save_cache(path: str, feats: dict) -> None:
    arrays = {}
    for method in ("l2norm", "attention", "rootsift"):
        for i, (k, d) in feats[method].items():
            arrays[f"{method}/{i}/k"], arrays[f"{method}/{i}/d"] = k, d
    for i, side in feats["side"].items():
        arrays[f"side/{i}"] = np.array(side)
    np.savez(path, **arrays)


def load_cache(path: str) -> dict:
    feats: dict = {"l2norm": {}, "attention": {}, "rootsift": {}, "side": {}}
    with np.load(path) as z:
        for key in z.files:
            parts = key.split("/")
            if parts[0] == "side":
                feats["side"][int(parts[1])] = float(z[key])
            elif parts[2] == "k":
                feats[parts[0]][int(parts[1])] = (z[key], z[f"{parts[0]}/{parts[1]}/d"])
    return feats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--global-cache", default=None, help="npz with a 'global' array (database rows then queries)")
    ap.add_argument("--cache", default=None, help="npz for the extracted local features (read if present)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=10, help="attention-head training epochs")
    ap.add_argument("--save-head", default=None, help="also write the trained head here (loupe --attention FILE)")
    ap.add_argument("--head", default=None, help="load this trained head instead of training one")
    ap.add_argument("--max-v", type=int, default=max(VS), help="largest V measured; local features are extracted for the union of the top-V")
    ap.add_argument("--min-inliers", type=int, action="append", default=None, help="extra verification thresholds to report")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(1)  # pairs run in parallel through the pool instead
    root = require_roxford()
    gt = load_ground_truth(root / "gnd_roxford5k_subset.pkl")
    n_db = len(gt.imlist)
    items = [(n, None) for n in gt.imlist] + [(n, g["bbx"]) for n, g in zip(gt.qimlist, gt.gnd)]
    print(f"machine: {machine()}; torch threads {args.threads}; load average {os.getloadavg()[0]:.1f}", flush=True)
    backbone = load_backbone(None, fuse_bn=True)

    held_out = {landmark(q) for q in gt.qimlist}
    if args.head:
        head, meta = load_attention(args.head)
        print(f"attention: loaded {args.head} (trained on {meta.get('classes')}, none of {sorted(held_out)})")
    else:
        head = train_head(backbone, root, gt, held_out, args.epochs)
        if args.save_head:
            save_attention(head, args.save_head, layer=LocalConfig().layer,
                           meta={"classes": sorted({landmark(n) for n in gt.imlist if landmark(n) not in held_out})})

    if args.global_cache and os.path.exists(args.global_cache):
        g = np.load(args.global_cache)["global"]
    else:
        gext = GlobalExtractor(backbone, GlobalConfig(pooling="rmac", max_side=512))
        g = np.stack([gext.extract(load(root, n, b)).vector for n, b in items])
    db, q = g[:n_db], g[n_db:]
    sims = db @ q.T
    base_rank = np.argsort(-sims, axis=0)
    vs = [v for v in VS if v <= args.max_v] or [args.max_v]
    wanted = sorted(set(base_rank[: max(vs)].ravel().tolist()) | set(range(n_db, n_db + len(q))))
    if args.cache and os.path.exists(args.cache):
        feats = load_cache(args.cache)
    else:
        raw = extract_local(root, items, wanted, head, backbone)
        feats = {"rootsift": raw["rootsift"], "side": raw["side"]}
        for method in ("l2norm", "attention"):
            train_rows = [i for i in wanted if i < n_db][:PCA_IMAGES]
            pca = LocalPCA().fit(np.concatenate([raw[method][i].descriptors for i in train_rows]), dim=40)
            rows = {i: LocalStore.quantize(f.keypoints, pca.apply(f.descriptors)) for i, f in raw[method].items()}
            print(f"{method}: {np.mean([r.nbytes for i, r in rows.items() if i < n_db]) / 1024:.1f} KB per image of local features "
                  f"(mean keypoints {np.mean([len(r.keypoints) for r in rows.values()]):.0f})")
            feats[method] = {i: dequantized(r) for i, r in rows.items()}
        if args.cache:
            save_cache(args.cache, feats)
    print(f"global-only: {db.shape[1] * 4 / 1024:.1f} KB per image (float32); local features for {len(wanted)} images "
          f"(union of the queries' top-{max(vs)} and the queries)")

    def score(ranks: np.ndarray) -> str:
        s = evaluate_protocols(ranks, gt)
        return " / ".join(f"{s[p]['map']:6.2f}" for p in ("easy", "medium", "hard"))

    served = BrokerConfig().verify
    thresholds = [served.min_inliers] + [m for m in (args.min_inliers or []) if m != served.min_inliers]
    print(f"\n{'method':12s} {'V':>4s} {'min_inl':>7s} {'E / M / H mAP':>24s}")
    print(f"{'global only':12s} {'-':>4s} {'-':>7s} {score(base_rank):>24s}")
    pool = ThreadPoolExecutor(max_workers=args.threads)
    for method in ("l2norm", "attention", "rootsift"):
        # served parameters; RootSIFT with Lowe's ratio test instead of mutual nearest neighbours
        # (raw inlier counts down to the lowest threshold; each threshold is applied when ranking)
        floor = max(3, min(thresholds))
        p = dataclasses.replace(served, min_inliers=floor) if method != "rootsift" else dataclasses.replace(
            served, matcher="ratio", ratio=ROOTSIFT_RATIO, min_inliers=floor)
        inliers = np.zeros((max(vs), len(q)), dtype=np.int64)
        cpu: list[float] = []
        stage_wall: list[float] = []
        for j in range(len(q)):
            qf = feats[method][n_db + j]
            cands = base_rank[: max(vs), j]

            def run(c: int, qf=qf) -> tuple[int, float]:
                t = time.thread_time()
                r = verify_pair(*qf, *feats[method][c], p, candidate_side=feats["side"][c])
                return r.inliers, time.thread_time() - t

            t = time.perf_counter()
            results = list(pool.map(run, cands))
            stage_wall.append((time.perf_counter() - t) * min(100, len(cands)) / len(cands))
            for row, (n_in, dt) in enumerate(results):
                inliers[row, j] = n_in
                cpu.append(dt)
        for m in thresholds:
            for V in vs:
                ranks = base_rank.copy()
                for j in range(len(q)):
                    order = rerank_by_inliers(sims[base_rank[:V, j], j], inliers[:V, j], m)
                    ranks[:V, j] = base_rank[:V, j][order]
                print(f"{method:12s} {V:4d} {m:7d} {score(ranks):>24s}", flush=True)
        print(f"{method:12s} match + RANSAC per pair (thread CPU): {stats_ms(cpu)}; stage at V=100 ({args.threads} threads): "
              f"{stats_ms(stage_wall)} per query")


if __name__ == "__main__":
    main()
