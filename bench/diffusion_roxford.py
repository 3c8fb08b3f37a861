"""What makes diffusion pay on the ROxford subset: global vs regional nodes, regions taken at
512 or 1024 px, all 21 regions vs a per-image k-means reduction to 5 (the paper's), mAP and ms
per query for each variant, beside plain search, from one set of extracted features.

Features (computed once, cached with ``--cache FILE.npz``): the served global descriptor
(R-MAC, 3 scales, 512 px), its regional vectors at 512 px, and regional vectors of the
1024-px working image (one more backbone pass to the last conv map). Every variant reranks
the global top-R with the broker's own stage function
(`services.rerank.diffusion.diffusion_rerank`).

    .venv/bin/python bench/diffusion_roxford.py [--cache /tmp/roxford_regions.npz] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import load_as_served, machine, require_roxford  # noqa: E402
from services.rerank.diffusion import diffusion_rerank  # noqa: E402
from services.eval.ground_truth import load_ground_truth  # noqa: E402
from services.eval.revisitop import evaluate_protocols  # noqa: E402
from services.extractor.backbone import load_backbone, preprocess  # noqa: E402
from services.extractor.global_descriptor import GlobalConfig, GlobalExtractor  # noqa: E402
from services.extractor.pooling import regional_vectors  # noqa: E402
from services.rerank.diffusion import DiffusionParams  # noqa: E402
from services.rerank.graph import CollectionGraph  # noqa: E402
from services.space.regions import reduce_regions  # noqa: E402

WORKING_SIDE = 1024


def extract(root, gt) -> dict[str, np.ndarray]:
    """Global (N, D), regional at 512 (N, 21, D) and at 1024 (N, 21, D), database then queries."""
    backbone = load_backbone(None, fuse_bn=True)
    ext = GlobalExtractor(backbone, GlobalConfig(pooling="rmac", max_side=512))
    items = [(n, None) for n in gt.imlist] + [(n, g["bbx"]) for n, g in zip(gt.qimlist, gt.gnd)]
    out: dict[str, list] = {"global": [], "regional512": [], "regional1024": []}
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i, (name, box) in enumerate(items):
            img = load_as_served((root / "jpg" / f"{name}.jpg").read_bytes(), box, WORKING_SIDE)
            g = ext.extract(img)
            fmap = backbone.forward_features(preprocess(img))
            out["global"].append(g.vector)
            out["regional512"].append(g.regional)
            out["regional1024"].append(regional_vectors(fmap, 3)[0].numpy())
            if (i + 1) % 100 == 0:
                print(f"  {i + 1}/{len(items)} images, {(i + 1) / (time.perf_counter() - t0):.2f} images/s", flush=True)
    feats = {"global": np.stack(out["global"]).astype(np.float32)}
    for key in ("regional512", "regional1024"):  # ragged: the region count follows the aspect ratio
        feats[key] = np.concatenate(out[key]).astype(np.float32)
        feats[key + "_count"] = np.array([len(r) for r in out[key]])
    return feats


def split_regions(flat: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    """Flat ``(sum counts, D)`` → one ``(count_i, D)`` array per image."""
    return np.split(flat, np.cumsum(counts)[:-1])


def reduce_each(per_image: list[np.ndarray], n: int, iterations: int = 10) -> list[np.ndarray]:
    """``reduce_regions`` over images with different region counts (batched by count).

    ``per_image``: ``(R_i, D)`` arrays; returns ``(min(n, R_i), D)`` float32 arrays, aligned.
    """
    out: list[np.ndarray] = [np.zeros((0, 0), np.float32)] * len(per_image)
    counts = np.array([len(r) for r in per_image])
    for c in np.unique(counts):
        idx = np.flatnonzero(counts == c)
        if c == 0:
            for i in idx:
                out[i] = np.asarray(per_image[i], dtype=np.float32)
            continue
        reduced = reduce_regions(np.stack([per_image[i] for i in idx]), n, iterations)
        for j, i in enumerate(idx):
            out[i] = reduced[j]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=None, help="npz file for the extracted features (read if present)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reduce", type=int, default=5, help="regions per image after k-means")
    ap.add_argument("--only", default=None, help="run only the variants whose label contains this text")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = require_roxford()
    gt = load_ground_truth(root / "gnd_roxford5k_subset.pkl")
    if args.cache and os.path.exists(args.cache):
        feats = dict(np.load(args.cache))
    else:
        feats = extract(root, gt)
        if args.cache:
            np.savez(args.cache, **feats)
    n_db = len(gt.imlist)
    g = feats["global"]
    db, q = g[:n_db], g[n_db:]
    regions = {side: split_regions(feats[f"regional{side}"], feats[f"regional{side}_count"]) for side in ("512", "1024")}
    print(f"machine: {machine()}; {n_db} database images, {len(q)} queries, D={g.shape[1]}, regions per image "
          f"{np.median(feats['regional512_count']):.0f} (median), {torch.get_num_threads()} threads")
    base_rank = np.argsort(-(db @ q.T), axis=0)  # (n_db, Q)

    for side in ("512", "1024"):
        t0 = time.perf_counter()
        regions["red" + side] = reduce_each(regions[side], args.reduce)
        print(f"k-means to {args.reduce} regions at {side} px: {(time.perf_counter() - t0) / len(g) * 1e3:.2f} ms per image")

    t0 = time.perf_counter()
    graph = CollectionGraph.build([str(i) for i in range(n_db)], db, k=50)
    print(f"collection graph over the database: k=50, {time.perf_counter() - t0:.2f} s")
    # (label, R, nodes, params, query): nodes None = global online, "graph" = global from the
    # collection graph, "512"/"1024" = every region, "red512"/"red1024" = k-means-reduced
    # regions; query "full" = all the query's regions + its global vector, "reduced" = the
    # query's regions reduced the same way, "reduced+global" = those + its global vector.
    M = DiffusionParams(k=50, aggregate="max")
    variants: list[tuple[str, int, str | None, DiffusionParams, str]] = [
        ("diffuse global R=1000 k=50 (online graph)", 1000, None, DiffusionParams(k=50), "full"),
        ("diffuse global R=1000 k=50 (collection graph)", 1000, "graph", DiffusionParams(k=50), "full"),
        ("diffuse global R=200 k=50 (collection graph)", 200, "graph", DiffusionParams(k=50), "full"),
    ]
    for side in ("512", "1024"):
        red = f"{args.reduce}/img"
        variants += [
            (f"regional {side}px all/img R=200 k=50 max", 200, side, M, "full"),
            (f"regional {side}px {red} R=200 k=50 max", 200, "red" + side, M, "full"),
            (f"regional {side}px {red} R=200 k=50 max, reduced query", 200, "red" + side, M, "reduced"),
            (f"regional {side}px {red} R=200 k=50 max, reduced query + global", 200, "red" + side, M, "reduced+global"),
            (f"regional {side}px {red} R=1000 k=50 max, reduced query", 1000, "red" + side, M, "reduced"),
            (f"regional {side}px {red} R=1000 k=50 max, reduced query + global", 1000, "red" + side, M, "reduced+global"),
            (f"regional {side}px {red} R=200 k=50 sum", 200, "red" + side, DiffusionParams(k=50, aggregate="sum"), "full"),
            (f"regional {side}px {red} R=500 k=50 max", 500, "red" + side, M, "full"),
            (f"regional {side}px {red} R=1000 k=50 max", 1000, "red" + side, M, "full"),
            (f"regional {side}px {red} R=1000 k=100 max", 1000, "red" + side, DiffusionParams(k=100, aggregate="max"), "full"),
        ]

    def score(ranks: np.ndarray) -> str:
        s = evaluate_protocols(ranks, gt)
        return " / ".join(f"{s[p]['map']:6.2f}" for p in ("easy", "medium", "hard"))

    print(f"{'variant':48s} {'E / M / H mAP':>26s}  {'ms/query median (max)':>22s}")
    print(f"{'plain search (R-MAC-ms 512)':48s} {score(base_rank):>26s}")
    for name, R, nodes_kind, params, qmode in variants:
        if args.only and args.only not in name:
            continue
        ranks, ms = base_rank.copy(), []
        for j in range(len(q)):
            top = base_rank[:R, j]
            edges = None
            if nodes_kind is None:
                nodes, owner, query = db[top], None, q[j]
            elif nodes_kind == "graph":
                nodes, owner, query = db[top], None, q[j]
            else:
                per = [regions[nodes_kind][i] for i in top]
                nodes = np.concatenate(per)
                owner = np.repeat(np.arange(len(top)), [len(r) for r in per])
                # the query keeps all its regions plus its global vector, as the broker seeds it
                if qmode == "full":
                    query = np.concatenate([regions[nodes_kind.replace("red", "")][n_db + j], q[j][None]])
                else:
                    query = regions[nodes_kind][n_db + j]
                    if qmode == "reduced+global":
                        query = np.concatenate([query, q[j][None]])
            t0 = time.perf_counter()
            if nodes_kind == "graph":
                edges = graph.neighbourhood_lists([str(i) for i in top], nodes, params.k)
            elif nodes_kind is not None and nodes_kind.startswith("red"):  # the broker reduces per query
                reduce_each([regions[nodes_kind[3:]][i] for i in top], args.reduce)
            out = diffusion_rerank(query, nodes, owner, len(top), params, edges=edges)
            ms.append((time.perf_counter() - t0) * 1e3)
            order = np.argsort(-out.scores, kind="stable")
            ranks[: len(top), j] = top[order]
        print(f"{name:48s} {score(ranks):>26s}  {np.median(ms):9.1f} ({max(ms):.1f}) ms", flush=True)


if __name__ == "__main__":
    main()

