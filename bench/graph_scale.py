"""The collection kNN graph at scale, built by a real broker over a real shard: time, broker
memory, graph size, and neighbour recall against the shard's own near-exact search.

Takes a shard directory written by ``bench/shard_scale.py --dir DIR`` (it keeps
``DIR/loupe-scale-*/shard``), serves it as shard 0 of a one-shard cluster and runs BuildGraph.
Recall: for ``--check`` random nodes, the share of their 50 graph neighbours among the top 50 the
shard returns for their vector (the shard's approximate index re-scored exactly: recall@100
0.99+ against exact search at 1M, BENCHMARKS.md).

    .venv/bin/python bench/graph_scale.py --shard-dir /work/scale/loupe-scale-XXXX/shard

Results go to BENCHMARKS.md ("Shard at scale").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import machine  # noqa: E402


def status_mb(key: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024 / 1e6
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shard-dir", required=True)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--check", type=int, default=200)
    args = ap.parse_args()
    from cluster.config import ClusterConfig
    from cluster.launcher import Cluster
    from loupe.client import RetrievalClient
    from loupe.tensors import from_tensor, to_tensor
    from loupe.v1 import shard_pb2

    data = tempfile.mkdtemp(prefix="loupe-graph-")
    os.symlink(os.path.abspath(args.shard_dir), os.path.join(data, "shard-000"))
    print(f"machine: {machine()}; load average {os.getloadavg()}", flush=True)
    cfg = ClusterConfig(shards=1, replicas=1, data_dir=data, max_side=256, global_max_side=256, scales=(1.0,))
    with Cluster(cfg) as cluster, RetrievalClient(cluster.broker_address) as client:
        client.wait_ready(120)
        images = client.stats().images
        anon0, hwm0 = status_mb("RssAnon"), status_mb("VmHWM")
        t0 = time.perf_counter()
        built = client.build_graph(k=args.k, timeout_s=7200)
        seconds = time.perf_counter() - t0
        anon1, hwm1 = status_mb("RssAnon"), status_mb("VmHWM")
        graph = cluster._broker.servicer.collection.graph
        rng = np.random.default_rng(0)
        rows = rng.choice(len(graph.ids), size=min(args.check, len(graph.ids)), replace=False)
        shard = cluster._broker.servicer.shards[0]
        import asyncio

        async def neighbours(image_id: str) -> list[str]:
            f = await shard.get_features(shard_pb2.GetFeaturesRequest(shard_id=0, ids=[image_id], want_global=True), 30)
            q = from_tensor(f.features[0].__getattribute__("global"))
            r = await shard.search(shard_pb2.ShardSearchRequest(shard_id=0, query=to_tensor(q), top_k=args.k + 1, query_transformed=True), 30)
            return [i for i in r.ids if i != image_id][: args.k]

        loop = cluster._loop
        recall = []
        for r in rows:
            truth = set(asyncio.run_coroutine_threadsafe(neighbours(graph.ids[r]), loop).result(60))
            got = {graph.ids[j] for j in graph.neighbours[r] if j >= 0}
            recall.append(len(got & truth) / max(len(truth), 1))
        print(json.dumps({
            "images": images, "graph_images": built.images, "k": built.k, "graph_mb": round(built.bytes / 1e6, 1),
            "build_s": round(seconds, 1), "broker_process_rss_anon_growth_mb": round(anon1 - anon0, 1),
            "broker_process_peak_rss_mb": round(hwm1, 1), "peak_before_mb": round(hwm0, 1),
            "neighbour_recall_at_50": round(float(np.mean(recall)), 4), "load_average": os.getloadavg(),
        }), flush=True)


if __name__ == "__main__":
    main()
