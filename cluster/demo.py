"""``loupe demo``: a self-contained run on real photos bundled with scikit-image.

Builds a small collection (each photo plus cropped / scaled / rotated copies, and texture
distractors), starts a local cluster with 2 shards, indexes it, searches with held-out
transforms (perspective, occlusion, brightness) and prints the results and the mAP.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Callable

import cv2
import numpy as np

PHOTOS = (
    "astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "moon",
    "hubble_deep_field", "immunohistochemistry", "retina", "stereo_motorcycle", "clock", "cell",
)
DISTRACTORS = ("brick", "grass", "gravel", "text", "page", "colorwheel")


def load_photo(name: str) -> np.ndarray:
    """A scikit-image sample as (H, W, 3) uint8 RGB."""
    import skimage.data

    img = getattr(skimage.data, name)()
    if isinstance(img, tuple):
        img = img[0]
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3].astype(np.uint8))


def _crop(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    return img[int(0.1 * h) : int(0.85 * h), int(0.15 * w) : int(0.9 * w)]


def _scale(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    return cv2.resize(img, (int(w * 0.6), int(h * 0.6)), interpolation=cv2.INTER_AREA)


def _rotate(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), 20, 1.0)
    return cv2.warpAffine(img, m, (w, h), borderMode=cv2.BORDER_REFLECT)


def _perspective(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    dst = np.float32([[0.08 * w, 0.05 * h], [0.95 * w, 0], [w, h], [0.02 * w, 0.9 * h]])
    return cv2.warpPerspective(img, cv2.getPerspectiveTransform(src, dst), (w, h), borderMode=cv2.BORDER_REFLECT)


def _occlude(img: np.ndarray) -> np.ndarray:
    out = img.copy()
    h, w = img.shape[:2]
    out[int(0.3 * h) : int(0.65 * h), int(0.55 * w) : int(0.95 * w)] = (40, 120, 200)
    return out


def _brightness(img: np.ndarray) -> np.ndarray:
    return np.clip(img.astype(np.float32) * 1.35 + 25, 0, 255).astype(np.uint8)


INDEXED: dict[str, Callable[[np.ndarray], np.ndarray]] = {"orig": lambda x: x, "crop": _crop, "scale": _scale, "rotate": _rotate}
HELD_OUT: dict[str, Callable[[np.ndarray], np.ndarray]] = {"perspective": _perspective, "occlusion": _occlude, "brightness": _brightness}


def encode_jpeg(img: np.ndarray, quality: int = 90) -> bytes:
    """(H, W, 3) RGB uint8 → JPEG bytes."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def build_collection() -> tuple[list[tuple[str, bytes]], list[tuple[str, str, bytes]]]:
    """Database [(id, jpeg)] and queries [(name, photo, jpeg)]."""
    db, queries = [], []
    for name in PHOTOS:
        img = load_photo(name)
        for t, fn in INDEXED.items():
            db.append((f"{name}/{t}", encode_jpeg(fn(img))))
        for t, fn in HELD_OUT.items():
            queries.append((f"{name}/{t}", name, encode_jpeg(fn(img))))
    for name in DISTRACTORS:
        db.append((f"distractor/{name}", encode_jpeg(load_photo(name))))
    return db, queries


def average_precision(ranked_ids: list[str], positives: set[str]) -> float:
    """Non-interpolated AP of a ranking against a set of positive ids."""
    hits, total = 0, 0.0
    for i, image_id in enumerate(ranked_ids, start=1):
        if image_id in positives:
            hits += 1
            total += hits / i
    return total / len(positives) if positives else 0.0


def run_demo(json_output: bool = False) -> int:
    """Run the whole demo; returns a process exit code (0 when retrieval works: mAP > 0.5)."""
    from cluster.config import ClusterConfig
    from cluster.launcher import Cluster
    from cluster.whitening import after_index
    from loupe.client import ImageToAdd, RetrievalClient
    from loupe.rerank_spec import DEFAULT_SEARCH_RERANK, parse_rerank

    say = (lambda m: print(m, file=sys.stderr, flush=True)) if json_output else (lambda m: print(m, flush=True))
    db, queries = build_collection()
    say(f"collection: {len(db)} images ({len(PHOTOS)} photos x {len(INDEXED)} views + {len(DISTRACTORS)} distractors); {len(queries)} held-out queries")
    say("starting a local cluster: 2 shards, 1 extractor replica ...")
    t0 = time.perf_counter()
    with Cluster(ClusterConfig(shards=2, replicas=1)) as cluster, RetrievalClient(cluster.broker_address) as client:
        say(f"cluster up in {time.perf_counter() - t0:.1f} s; broker {cluster.broker_address}, metrics http://{cluster.metrics_address}/metrics")
        t1 = time.perf_counter()
        added = client.add_images((ImageToAdd(i, b) for i, b in db), batch_size=8).added
        index_s = time.perf_counter() - t1
        say(f"indexed {added} images in {index_s:.1f} s ({added / index_s:.1f} images/s)")
        w, why = after_index(client, None)  # what `loupe index` does next (too few images here: nothing)
        say(f"whitening learned from {w.pairs} verified pairs ({w.dim}-D)" if w is not None else why)
        client.build_graph()
        maps, rows = {}, []
        for spec in ("none", "verify", DEFAULT_SEARCH_RERANK):
            aps = []
            for qname, photo, data in queries:
                resp = client.search(image=data, k=len(db), rerank=parse_rerank(spec))
                ranked = [r.id for r in resp.results]
                aps.append(average_precision(ranked, {f"{photo}/{t}" for t in INDEXED}))
                if spec == "verify":
                    rows.append({
                        "query": qname, "ap": round(aps[-1] * 100, 2), "confidence": round(resp.query_confidence, 3),
                        "top3": [(r.id, round(r.score, 3), r.stages.inliers) for r in resp.results[:3]],
                    })
            maps[spec] = float(np.mean(aps)) * 100
        stats = client.stats()
    if json_output:
        print(json.dumps({"images": added, "queries": len(queries), "map": {k: round(v, 2) for k, v in maps.items()},
                          "index_images_per_s": round(added / index_s, 2), "results": rows}))
    else:
        say("searches with geometric verification (top-3: id, score, inliers):")
        for row in rows[:: max(1, len(rows) // 8)]:
            top = "  ".join(f"{i} ({s}, {n})" for i, s, n in row["top3"])
            say(f"  {row['query']:<32} AP {row['ap']:6.2f}  confidence {row['confidence']:.2f}  top-3: {top}")
        say("shards: " + ", ".join(f"{s.shard_id}: {s.images} images" for s in stats.shards))
        say(f"mAP over {len(queries)} held-out queries: global only {maps['none']:.2f}, with verification {maps['verify']:.2f}, "
            f"the default ({DEFAULT_SEARCH_RERANK}) {maps[DEFAULT_SEARCH_RERANK]:.2f}")
    say("cluster stopped.")
    return 0 if min(maps.values()) > 50 else 1
