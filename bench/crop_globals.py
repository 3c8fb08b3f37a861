"""Global-only ranking variants on cropped and whole-photo held-out queries (issue 27), in process.

Reads the confirmation set of ``bench/select_defaults.py make-set`` / ``make-crops`` (``--set``:
``split.json``, ``gnd.json`` = held-out whole photos, ``gnd-crop.json`` = held-out crops) and
the stopped cluster's ``--data-dir`` that indexed it (stored global vectors and the 5 regional
centroids per image), extracts every pooling of the database once at the served global size
(512 px, 3 scales; cached in ``--cache``), describes the queries under several **query
preparations**, and scores each variant with the revisitop protocol — no re-indexing:

``served``
    as the extractor prepares a search today: the crop cut from the full-resolution photo,
    shrunk to 1024 px if larger — **never upscaled** — then the global descriptor's 512-px
    cap (so a crop under 512 px keeps its own pixels, at 1-2x the scale its landmark has in
    the database images, which are described at 512 px);
``up512``
    the crop resized (up) to 512 px on its longest side;
``dbscale``
    the crop resized by the factor its full photo gets in the database (512 / longest side):
    the landmark at the scale it has in database images;
``ms5``
    the served crop at 5 scales (1, 0.71, 0.5, 0.35, 0.25 of its size capped at 1024 px):
    covers both its own and the database's scale.

Variants: pooling (R-MAC, GeM, MAC) × single (``ss``) / multi-scale (``ms``) database
descriptors × query preparation; **regional matching**: the query's global vector against each
database image's stored regional centroids (``reg5``: score = best region) or all its R-MAC
regions at 512 px (``regall``), alone or combined with the global score (``max``: the larger
of the two; ``sum``); and the shortlists the rerank stages start from: recall of the Medium
positives in the global top-V and in the union with the regional top-V.

Each variant's per-query APs go through ``select_defaults.decide`` (the protocol's rule) against
the served global descriptor (``rmac-ms/served``), on each set.

    .venv/bin/python bench/crop_globals.py --set /tmp/loupe-sel --data-dir DATA_DIR --cache /tmp/loupe-sel/db-global-512.npz
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import cv2
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import load_as_served, machine, require_roxford  # noqa: E402
from bench.global_variants import extract_all  # noqa: E402
from bench.select_defaults import decide, summarise  # noqa: E402
from services.eval.ground_truth import GroundTruth, load_ground_truth  # noqa: E402
from services.eval.revisitop import evaluate_protocols  # noqa: E402
from services.extractor.backbone import load_backbone  # noqa: E402
from services.extractor.global_descriptor import POOLINGS, GlobalConfig, GlobalExtractor  # noqa: E402
from services.extractor.runtime import BackboneRunner  # noqa: E402
from services.index.store import ShardStore  # noqa: E402

GLOBAL_SIDE = 512  # ClusterConfig.global_max_side
WORKING_SIDE = 1024  # ClusterConfig.max_side: the served crop's cap
MS5 = (1.0, 2**-0.5, 0.5, 2**-1.5, 0.25)
PREPS = ("served", "up512", "dbscale", "ms5")
BASELINE = "rmac-ms/served"
SHORTLISTS = (100, 200, 400)


def stored_vectors(data_dir: str, names: list[str]) -> tuple[np.ndarray, list[np.ndarray]]:
    """``((N, D) stored global vectors, N × (R_i, D) stored regional centroids)`` in ``names`` order."""
    found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for path in sorted(glob.glob(os.path.join(data_dir, "shard-*"))):
        store = ShardStore(path)
        try:
            for n in names:
                img = store.get(n, regional=True, local=False)
                if img is not None:
                    found[n] = (img.vector, img.regional.astype(np.float32) if img.regional is not None else img.vector[None])
        finally:
            store.close()
    missing = [n for n in names if n not in found]
    if missing:
        raise SystemExit(f"{data_dir}: {len(missing)} database images are not stored (e.g. {missing[:3]}): index the set's gnd.json first")
    return np.stack([found[n][0] for n in names]), [found[n][1] for n in names]


def prepared(data: bytes, box, prep: str, full_side: int) -> np.ndarray:
    """The query image of one preparation (module docstring); ``full_side``: the photo's longest side."""
    img = load_as_served(data, box, WORKING_SIDE)
    if prep == "up512":
        s = GLOBAL_SIDE / max(img.shape[:2])
        return cv2.resize(img, (round(img.shape[1] * s), round(img.shape[0] * s)), interpolation=cv2.INTER_LINEAR if s > 1 else cv2.INTER_AREA)
    if prep == "dbscale":
        s = min(1.0, GLOBAL_SIDE / full_side)
        return cv2.resize(img, (max(8, round(img.shape[1] * s)), max(8, round(img.shape[0] * s))), interpolation=cv2.INTER_AREA) if s < 1 else img
    return img


def describe_queries(gt: GroundTruth, exts: dict[str, GlobalExtractor], root) -> dict[str, np.ndarray]:
    """``"{pooling}-{ss|ms}/{prep}"`` → ``(n_queries, D)``, plus ``"regional/{prep}"`` (object array of (R, D))."""
    from PIL import Image

    out: dict[str, list] = {}
    for q, g in zip(gt.qimlist, gt.gnd):
        data = (root / "jpg" / f"{q}.jpg").read_bytes()
        with Image.open(root / "jpg" / f"{q}.jpg") as im:
            full_side = max(im.size)
        for prep in PREPS:
            img = prepared(data, g["bbx"], prep, full_side)
            for k, v in extract_all(exts["ms5" if prep == "ms5" else "served"], img).items():
                out.setdefault(f"{k}/{prep}", []).append(v)
    return {k: (np.stack(v) if not k.startswith("regional") else np.array(v, dtype=object)) for k, v in out.items()}


def describe_database(names: list[str], ext: GlobalExtractor, root, cache: str) -> dict[str, np.ndarray]:
    """Every pooling (ss, ms) and all R-MAC regions at 512 px of each database image, cached by name."""
    if os.path.exists(cache):
        z = np.load(cache, allow_pickle=True)
        have = list(z["names"])
        idx = [have.index(n) for n in names]
        return {k: z[k][idx] for k in z.files if k != "names"}
    feats: dict[str, list] = {}
    t0 = time.perf_counter()
    for i, n in enumerate(names):
        img = load_as_served((root / "jpg" / f"{n}.jpg").read_bytes(), None, WORKING_SIDE)
        for k, v in extract_all(ext, img).items():
            feats.setdefault(k, []).append(v)
        if (i + 1) % 100 == 0:
            print(f"  database {i + 1}/{len(names)} ({(i + 1) / (time.perf_counter() - t0):.2f} img/s)", file=sys.stderr, flush=True)
    out = {k: (np.stack(v) if k != "regional" else np.array(v, dtype=object)) for k, v in feats.items()}
    np.savez(cache, names=np.array(names), **out)
    return out


def region_scores(Q: np.ndarray, regions: list[np.ndarray]) -> np.ndarray:
    """``(N, n_q)``: for each database image, the best of its regions' similarities to each query."""
    R = np.concatenate(regions).astype(np.float32)
    owner = np.repeat(np.arange(len(regions)), [len(r) for r in regions])
    sims = R @ Q.T  # (total regions, n_q)
    out = np.full((len(regions), Q.shape[0]), -np.inf, dtype=np.float32)
    np.maximum.at(out, owner, sims)
    return out


def score_variants(db: dict[str, np.ndarray], stored_reg: list[np.ndarray], q: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Variant name → ``(N, n_q)`` scores (higher first)."""
    scores: dict[str, np.ndarray] = {}
    for pool in POOLINGS:
        for agg in ("ss", "ms"):
            for prep in PREPS:
                scores[f"{pool}-{agg}/{prep}"] = db[f"{pool}-{agg}"] @ q[f"{pool}-{agg}/{prep}"].T
    all_regions = [np.asarray(r, np.float32) for r in db["regional"]]
    for prep in PREPS:
        g = scores[f"rmac-ms/{prep}"]
        for rname, regs in (("reg5", stored_reg), ("regall", all_regions)):
            r = region_scores(q[f"rmac-ms/{prep}"], regs)
            scores[f"{rname}/{prep}"] = r
            scores[f"rmac-ms+{rname}-max/{prep}"] = np.maximum(g, r)
            scores[f"rmac-ms+{rname}-sum/{prep}"] = g + r
    return scores


def per_query_aps(scores: np.ndarray, gt: GroundTruth) -> dict[str, dict[str, float | None]]:
    s = evaluate_protocols(np.argsort(-scores, axis=0, kind="stable"), gt)
    return {qn: {p: s[p]["aps"][i] for p in ("medium", "hard")} for i, qn in enumerate(gt.qimlist)}


def shortlist_recall(scores: np.ndarray, gt: GroundTruth, queries: list[int], v: int, union_with: np.ndarray | None = None) -> tuple[float, float]:
    """Mean share of the Medium positives in the top-``v`` (∪ the top-``v`` of ``union_with``) over
    ``queries``, and the mean shortlist size."""
    recalls, sizes = [], []
    for qi in queries:
        pos = set(np.concatenate([gt.gnd[qi]["easy"], gt.gnd[qi]["hard"]]).tolist())
        if not pos:
            continue
        top = set(np.argsort(-scores[:, qi], kind="stable")[:v].tolist())
        if union_with is not None:
            top |= set(np.argsort(-union_with[:, qi], kind="stable")[:v].tolist())
        recalls.append(len(pos & top) / len(pos))
        sizes.append(len(top))
    return 100 * float(np.mean(recalls)), float(np.mean(sizes))


def load_sets(set_dir: str) -> tuple[dict, dict[str, GroundTruth]]:
    """The confirmation set of ``make-set`` / ``make-crops``: ``(split, {"crop": held-out crops,
    "whole": held-out whole photos})`` (both with the known queries and the same database)."""
    with open(os.path.join(set_dir, "split.json")) as f:
        split = json.load(f)
    return split, {"crop": load_ground_truth(os.path.join(set_dir, "gnd-crop.json")), "whole": load_ground_truth(os.path.join(set_dir, "gnd.json"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", required=True, help="directory of select_defaults.py make-set / make-crops")
    ap.add_argument("--data-dir", required=True, help="data directory of the stopped cluster that indexed the set's gnd.json")
    ap.add_argument("--cache", required=True, help="database descriptors (.npz, outside the repo)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--margin", type=float, default=2.0)
    ap.add_argument("--json", default=None, help="write every variant's per-query APs here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = require_roxford()
    split, sets = load_sets(args.set)
    names = sets["crop"].imlist
    model = load_backbone(fuse_bn=True)
    runner = BackboneRunner(model, ["head"], "onnxruntime", threads=args.threads)
    exts = {"served": GlobalExtractor(runner, GlobalConfig(max_side=GLOBAL_SIDE)),  # type: ignore[arg-type]
            "ms5": GlobalExtractor(runner, GlobalConfig(max_side=WORKING_SIDE, scales=MS5))}  # type: ignore[arg-type]
    stored, stored_reg = stored_vectors(args.data_dir, names)
    db = describe_database(names, exts["served"], root, args.cache)
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f}; database {len(names)} images; "
          f"stored vs re-extracted rmac-ms: min cosine {float(np.min(np.sum(stored * db['rmac-ms'], axis=1))):.4f}")
    dump = {}
    for set_name, gt in sets.items():
        q = describe_queries(gt, exts, root)
        scores = score_variants(db, stored_reg, q)
        scores["stored/served"] = stored @ q["rmac-ms/served"].T
        runs = {name: per_query_aps(s, gt) for name, s in scores.items()}
        dump[set_name] = runs
        print(f"\n## {set_name}: held-out queries as {'crops' if set_name == 'crop' else 'whole photos'} (global-only, Medium/Hard mAP)\n")
        summaries = {c: summarise(runs[c], split) for c in runs}
        keys = list(summaries[BASELINE])
        print("| variant | " + " | ".join(keys) + " |")
        print("|---|" + "---:|" * len(keys))
        for c in sorted(runs, key=lambda c: -summaries[c]["heldout.medium"]):
            print(f"| {c} | " + " | ".join(f"{summaries[c][k]:.1f}" for k in keys) + " |")
        print(f"\n### Decision rule against {BASELINE} (margin {args.margin})\n")
        for c, v in decide(runs, split, BASELINE, args.margin):
            if v.startswith("REPLACES"):
                print(f"- {c}: {v}")
        print("\n### Shortlist recall of the Medium positives (held-out / known queries)\n")
        held = [gt.qimlist.index(x) for x in split["heldout"]]
        known = [gt.qimlist.index(x) for x in split["known"]]
        print("| shortlist | " + " | ".join(f"V={v}" for v in SHORTLISTS) + " |")
        print("|---|" + "---:|" * len(SHORTLISTS))
        for label, main_s, other in (("global (served)", scores[BASELINE], None),
                                     ("global ∪ regional reg5", scores[BASELINE], scores["reg5/served"]),
                                     ("global ∪ regional regall", scores[BASELINE], scores["regall/served"]),
                                     ("rmac-ms+reg5-max", scores["rmac-ms+reg5-max/served"], None),
                                     ("rmac-ms+reg5-sum", scores["rmac-ms+reg5-sum/served"], None),
                                     ("rmac-ms+reg5-sum ∪ global", scores["rmac-ms+reg5-sum/served"], scores[BASELINE])):
            cells = []
            for v in SHORTLISTS:
                rh, sh = shortlist_recall(main_s, gt, held, v, other)
                rk, _ = shortlist_recall(main_s, gt, known, v, other)
                cells.append(f"{rh:.1f} / {rk:.1f} ({sh:.0f})")
            print(f"| {label} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dump, f)


if __name__ == "__main__":
    main()
