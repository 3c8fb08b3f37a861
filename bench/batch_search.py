"""Batch search throughput against the same queries one by one, and the cost of metadata filters.

Part 1 (real cluster: local Ray, 2 shards, 1 extractor replica, gRPC on loopback): the demo
photos (scikit-image samples) with their indexed variants are added, then the same queries are
sent (a) one Search call after another, (b) as SearchBatch calls of ``--batch`` queries. Vector
queries (stored descriptors, no rerank) and image queries (held-out variants of the photos,
extraction included, no rerank) are measured separately; queries/s over all queries.

Part 2 (one shard's index in process, synthetic unit vectors, no network): search latency of an
unfiltered query against filters keeping 1 % and 50 % of the shard, with the exact index and
with the approximate (IVF) index, median over ``--filter-queries`` queries.

    .venv/bin/python bench/batch_search.py [--batch 32] [--rounds 3] [--filter-images 100000] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import machine  # noqa: E402


def _cluster_part(args: argparse.Namespace) -> dict:
    from cluster.config import ClusterConfig
    from cluster.demo import HELD_OUT, INDEXED, PHOTOS, encode_jpeg, load_photo
    from cluster.launcher import Cluster
    from loupe.client import ImageToAdd, RetrievalClient, search_request
    from loupe.tensors import from_tensor

    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ClusterConfig(shards=2, replicas=1, max_side=args.max_side, global_max_side=args.max_side, data_dir=tmp)
        with Cluster(cfg) as cluster, RetrievalClient(cluster.broker_address) as client:
            client.wait_ready(60)
            photos = {p: load_photo(p) for p in PHOTOS}
            db = [ImageToAdd(f"{p}/{t}", encode_jpeg(fn(img)), {"photo": p}) for p, img in photos.items() for t, fn in INDEXED.items()]
            client.add_images(db, batch_size=16)
            ids = [d.image_id for d in db]
            vecs = [from_tensor(i.vector) for i in client.get_images(ids, with_vector=True).images]
            images = [encode_jpeg(fn(img)) for img in photos.values() for fn in HELD_OUT.values()]
            suites = {
                "vector": [search_request(vector=vecs[i % len(vecs)], k=10) for i in range(args.batch * 4)],
                "image": [search_request(image=images[i % len(images)], k=10) for i in range(args.batch * 2)],
            }
            out["collection"] = len(db)
            for name, queries in suites.items():
                client.search_batch(queries[: args.batch])  # warm-up (channels, extractor)
                one, batch = [], []
                for _ in range(args.rounds):
                    t0 = time.perf_counter()
                    singles = [client.stub.Search(q, timeout=120) for q in queries]
                    one.append(len(queries) / (time.perf_counter() - t0))
                    t0 = time.perf_counter()
                    batched = [r for s in range(0, len(queries), args.batch) for r in client.search_batch(queries[s : s + args.batch], timeout_s=300).results]
                    batch.append(len(queries) / (time.perf_counter() - t0))
                    assert all(r.status.code == 0 for r in batched)
                    assert [[x.id for x in r.response.results] for r in batched][:5] == [[x.id for x in s.results] for s in singles][:5]
                out[name] = {"queries": len(queries), "one_by_one_qps": float(np.median(one)), "batch_qps": float(np.median(batch)),
                             "gain": float(np.median(batch) / np.median(one))}
    return out


def _filter_part(args: argparse.Namespace) -> dict:
    from loupe.v1 import types_pb2
    from services.index.metadata_filter import compile_filter
    from services.index.shard_index import ShardIndex
    from services.index.store import ShardStore, StoredImage
    from services.index.vector_index import IndexSettings

    rng = np.random.default_rng(0)
    n, d = args.filter_images, args.dim
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    out: dict = {"images": n, "dim": d}
    for kind, settings in (("exact", IndexSettings(factory="Flat")),
                           ("approximate", IndexSettings(factory="auto", approx_min_images=min(n, 50_000), train_sample=min(n, 50_000)))):
        with tempfile.TemporaryDirectory() as tmp:
            idx = ShardIndex(ShardStore(os.path.join(tmp, "s")), settings, background=False)
            for s in range(0, n, 5000):
                idx.add([StoredImage(f"i{j:07d}", x[j], None, None, {"p1": str(j % 100 == 0), "p50": str(j % 2 == 0)}) for j in range(s, min(n, s + 5000))])
            flts = {
                "none": None,
                "1%": compile_filter(types_pb2.Filter(all=[types_pb2.Condition(key="p1", equals="True")])),
                "50%": compile_filter(types_pb2.Filter(all=[types_pb2.Condition(key="p50", equals="True")])),
            }
            idx.search(x[0], 10, conditions=flts["1%"])  # builds the metadata index (once per shard)
            res = {"index": idx.factory}
            for name, conds in flts.items():
                lat = []
                want = min(100, n if conds is None else (n + 99) // 100 if name == "1%" else n // 2)
                for q in rng.standard_normal((args.filter_queries, d)).astype(np.float32):
                    q /= np.linalg.norm(q)
                    t0 = time.perf_counter()
                    hits = idx.search(q, 100, conditions=conds)
                    lat.append(time.perf_counter() - t0)
                    assert len(hits.ids) == want, (name, len(hits.ids), want)
                res[name] = {"p50_ms": 1000 * float(np.median(lat)), "p90_ms": 1000 * float(np.percentile(lat, 90))}
            idx.close()
            out[kind] = res
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-side", type=int, default=512)
    ap.add_argument("--filter-images", type=int, default=100_000)
    ap.add_argument("--filter-queries", type=int, default=50)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--skip-cluster", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    result = {"machine": machine(), "load_before": os.getloadavg()[0]}
    if not args.skip_cluster:
        result["batch"] = _cluster_part(args)
    result["filters"] = _filter_part(args)
    result["load_after"] = os.getloadavg()[0]
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"machine: {result['machine']}; load average {result['load_before']:.1f} → {result['load_after']:.1f}")
    if "batch" in result:
        b = result["batch"]
        print(f"collection: {b['collection']} images, 2 shards, 1 extractor; batches of {args.batch}")
        for name in ("vector", "image"):
            r = b[name]
            print(f"  {name:<6} {r['queries']:>4} queries  one by one {r['one_by_one_qps']:8.1f} q/s   batch {r['batch_qps']:8.1f} q/s   x{r['gain']:.2f}")
    f = result["filters"]
    print(f"filters: one shard, {f['images']} images, D={f['dim']}, top-100")
    for kind in ("exact", "approximate"):
        r = f[kind]
        print(f"  {kind:<11} ({r['index']}): " + "   ".join(f"{n} p50 {r[n]['p50_ms']:.1f} ms p90 {r[n]['p90_ms']:.1f} ms" for n in ("none", "1%", "50%")))


if __name__ == "__main__":
    main()
