"""Image searches while one of two extractor replicas is hung (SIGSTOP), hedging on and off
(issue 22, part 1), against the same searches with both replicas healthy, in one process run.

For each ``--hedge`` setting (seconds; 0 = fail over only when a replica fails) a real cluster
(local Ray, gRPC on 127.0.0.1, 2 extractor replicas, 1 shard) indexes the demo photos, then runs
``--queries`` sequential image searches (rerank none, deadline ``--deadline``) with both
replicas healthy (baseline), then the same with replica 1 stopped (SIGSTOP). Reported per
setting: p50 / p99 latency and failures of each phase. Without hedging a hung replica costs the
calls that reach it the caller's whole deadline until the broker's health check (every
``--health-period`` s) marks it and sends calls elsewhere first.

    .venv/bin/python bench/hung_replica.py [--hedge 0,1,2] [--queries 40] [--deadline 8] [--health-period 5]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time

import grpc
import numpy as np
import ray

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import machine  # noqa: E402
from cluster.config import ClusterConfig  # noqa: E402
from cluster.demo import HELD_OUT, INDEXED, PHOTOS, encode_jpeg, load_photo  # noqa: E402
from cluster.launcher import Cluster  # noqa: E402
from loupe.client import ImageToAdd, RetrievalClient  # noqa: E402
from loupe.rerank_spec import parse_rerank  # noqa: E402
from services.broker.config import BrokerConfig  # noqa: E402


def _searches(client: RetrievalClient, queries: list[bytes], deadline: float) -> tuple[list[float], int]:
    """Latencies (ms) of answered searches and the number that failed."""
    took, failed = [], 0
    for q in queries:
        t0 = time.perf_counter()
        try:
            client.search(image=q, k=5, rerank=parse_rerank("none"), timeout_s=deadline)
        except grpc.RpcError:
            failed += 1
            continue
        took.append((time.perf_counter() - t0) * 1e3)
    return took, failed


def _summary(took: list[float], failed: int) -> str:
    if not took:
        return f"no answer, {failed} failed"
    return f"p50 {np.percentile(took, 50):7.1f} ms  p99 {np.percentile(took, 99):7.1f} ms  failed {failed}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hedge", default="0,1,2", help="comma-separated --extract-hedge-s settings")
    ap.add_argument("--queries", type=int, default=40)
    ap.add_argument("--deadline", type=float, default=8.0)
    ap.add_argument("--health-period", type=float, default=5.0)
    args = ap.parse_args()
    print(machine(), f"load {os.getloadavg()[0]:.2f}", flush=True)
    photos = PHOTOS[:4]
    queries = [encode_jpeg(HELD_OUT["perspective"](load_photo(photos[i % len(photos)]))) for i in range(args.queries)]
    for hedge in (float(h) for h in args.hedge.split(",")):
        cfg = ClusterConfig(shards=1, replicas=2, max_side=256, global_max_side=256, scales=(1.0,), data_dir=tempfile.mkdtemp(prefix="hung-"))
        with Cluster(cfg, BrokerConfig(extract_hedge_s=hedge, shard_health_period_s=args.health_period)) as cluster:
            with RetrievalClient(cluster.broker_address, retries=False) as client:
                client.wait_ready(60)
                client.add_images([ImageToAdd(f"{p}/{t}", encode_jpeg(fn(load_photo(p)))) for p in photos for t, fn in INDEXED.items()])
                healthy = _searches(client, queries, args.deadline)
                victim = ray.get(cluster.extractor_actors[1].pid.remote())
                os.kill(victim, signal.SIGSTOP)
                try:
                    hung = _searches(client, queries, args.deadline)
                finally:
                    os.kill(victim, signal.SIGCONT)
        label = f"hedge {hedge:g} s" if hedge else "no hedging"
        print(f"{label:>12}: both healthy {_summary(*healthy)} | one hung {_summary(*hung)}", flush=True)


if __name__ == "__main__":
    main()
