"""Fan-out overhead (issue 14, item 6): search by vector through the broker over S shards
against one in-process faiss index holding the same vectors, in the same process run.

For each S in ``--shards``: a real cluster (local Ray, gRPC on 127.0.0.1) whose shards are
filled directly over their gRPC Add (global vectors only, placed as the broker places them);
then ``--queries`` sequential ``Search(vector, k)`` calls (p50/p95 latency), and the same
queries as ``SearchBatch`` requests of ``--batch`` (queries/s). The baseline is
``faiss.IndexFlatIP`` over the same vectors in this process: one query at a time (p50) and
batches of ``--batch`` (queries/s). Reported: broker overhead = broker p50 − in-process p50,
and batched throughput as a ratio of the in-process one.

Vectors: real served global descriptors of the ROxford subset (``--cache`` from
bench/shard_scale.py) plus Gaussian noise, L2-normalised; a 64-cluster Gaussian mixture when the
cache is absent.

    .venv/bin/python bench/fanout_overhead.py [--vectors 100000] [--shards 1,2,4] [--queries 200] [--batch 32] [--index-factory Flat]

The shards' index is exact (``Flat``) by default, like the baseline; with ``--index-factory auto``
(the served policy) shards of ≥ ``approx_min_images`` vectors answer from a trained IVF-PQ index
with exact re-scoring, one query at a time.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import faiss
import grpc
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import machine  # noqa: E402
from cluster.config import ClusterConfig  # noqa: E402
from cluster.launcher import Cluster  # noqa: E402
from loupe.client import RetrievalClient  # noqa: E402
from loupe.tensors import to_tensor  # noqa: E402
from loupe.v1 import retrieval_pb2, shard_pb2, shard_pb2_grpc, types_pb2  # noqa: E402
from services.space.placement import Placement  # noqa: E402

D = 1280


def vectors(n: int, cache: str, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """``(n, D)`` float32 unit vectors and a description of where they come from."""
    if os.path.exists(cache):
        seeds = np.load(cache)["db"].astype(np.float32)
        what = f"ROxford-subset descriptors ({cache}) + noise"
    else:
        seeds = rng.standard_normal((64, D)).astype(np.float32)
        what = "64-cluster Gaussian mixture"
    x = seeds[rng.integers(0, len(seeds), n)] + 0.03 * rng.standard_normal((n, D)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), what


def _pct(ms: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(ms), q))


def in_process(x: np.ndarray, queries: np.ndarray, k: int, batch: int) -> dict:
    index = faiss.IndexFlatIP(D)
    index.add(x)
    lat = []
    for q in queries:
        t0 = time.perf_counter()
        index.search(q[None, :], k)
        lat.append((time.perf_counter() - t0) * 1e3)
    t0 = time.perf_counter()
    for i in range(0, len(queries), batch):
        index.search(queries[i : i + batch], k)
    qps = len(queries) / (time.perf_counter() - t0)
    return {"p50_ms": _pct(lat, 50), "p95_ms": _pct(lat, 95), "batched_qps": qps}


def fill_shards(client: RetrievalClient, x: np.ndarray, n_shards: int) -> None:
    """Add every vector to its shard (broker placement) over the shards' own gRPC Add."""
    stubs = {}
    for s in client.stats().shards:
        ch = grpc.insecure_channel(s.address, options=[("grpc.max_send_message_length", 64 << 20)])
        stubs[s.shard_id] = shard_pb2_grpc.ShardStub(ch)
    by_shard: dict[int, list[shard_pb2.ShardRecord]] = {sid: [] for sid in stubs}

    def flush(sid: int) -> None:
        if by_shard[sid]:
            stubs[sid].Add(shard_pb2.ShardAddRequest(shard_id=sid, records=by_shard[sid]), timeout=600)
            by_shard[sid] = []

    for i, v in enumerate(x):
        image_id = f"v{i:08d}"
        f = types_pb2.ImageFeatures(width=1024, height=768)
        f.__getattribute__("global").CopyFrom(to_tensor(v))
        sid = Placement(n_shards).shard_of(image_id)
        by_shard[sid].append(shard_pb2.ShardRecord(id=image_id, features=f))
        if len(by_shard[sid]) >= 2000:
            flush(sid)
    for sid in stubs:
        flush(sid)


def through_broker(client: RetrievalClient, queries: np.ndarray, k: int, batch: int) -> dict:
    lat = []
    for q in queries:
        t0 = time.perf_counter()
        client.search(vector=q, k=k, timeout_s=60)
        lat.append((time.perf_counter() - t0) * 1e3)
    t0 = time.perf_counter()
    for i in range(0, len(queries), batch):
        reqs = [retrieval_pb2.SearchRequest(vector=to_tensor(q), k=k) for q in queries[i : i + batch]]
        resp = client.search_batch(reqs, timeout_s=120)
        assert all(r.status.code == 0 for r in resp.results), [r.status for r in resp.results if r.status.code]
    qps = len(queries) / (time.perf_counter() - t0)
    return {"p50_ms": _pct(lat, 50), "p95_ms": _pct(lat, 95), "batched_qps": qps}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vectors", type=int, default=100_000)
    ap.add_argument("--shards", default="1,2,4")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--cache", default="/tmp/loupe-roxford-global-512.npz")
    ap.add_argument("--index-factory", default="Flat",
                    help="the shards' index (default Flat: exact, as the in-process baseline; 'auto' = the served policy)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    x, what = vectors(args.vectors, args.cache, rng)
    queries = x[rng.integers(0, len(x), args.queries)] + 0.02 * rng.standard_normal((args.queries, D)).astype(np.float32)
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    print(f"machine: {machine()}; {args.vectors} vectors ({what}); shards' index {args.index_factory}; k={args.k}; {args.queries} queries; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    base = in_process(x, queries, args.k, args.batch)
    print(f"in-process faiss Flat: p50 {base['p50_ms']:.2f} ms, p95 {base['p95_ms']:.2f} ms, batched {base['batched_qps']:.0f} q/s", flush=True)
    rows = []
    for s in (int(v) for v in args.shards.split(",")):
        with tempfile.TemporaryDirectory(prefix="loupe-fanout-") as data, Cluster(ClusterConfig(shards=s, replicas=1, data_dir=data, index_factory=args.index_factory)) as cluster:
            with RetrievalClient(cluster.broker_address, retries=False) as client:
                client.wait_ready(120)
                fill_shards(client, x, s)
                client.search(vector=queries[0], k=args.k)  # warm-up
                b = through_broker(client, queries, args.k, args.batch)
        base_now = in_process(x, queries, args.k, args.batch)  # baseline again, same load conditions
        row = {"shards": s, **b, "base_p50_ms": base_now["p50_ms"], "base_qps": base_now["batched_qps"],
               "overhead_p50_ms": b["p50_ms"] - base_now["p50_ms"], "qps_ratio": b["batched_qps"] / base_now["batched_qps"],
               "load_average": os.getloadavg()[0]}
        rows.append(row)
        print(row, flush=True)
    print("\n| shards | broker p50 ms | p95 ms | in-process p50 ms | overhead p50 ms | broker batched q/s | in-process batched q/s | ratio | load avg |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['shards']} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['base_p50_ms']:.2f} | {r['overhead_p50_ms']:.2f} | "
              f"{r['batched_qps']:.0f} | {r['base_qps']:.0f} | {r['qps_ratio']:.2f} | {r['load_average']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
