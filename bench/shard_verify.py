"""Verification where the features live: the broker's way vs the shards' way, in one run.

Stores ``--candidates`` images per shard with served-size local features (1000 keypoints,
40-D, int8 like the shard keeps them) on ``--shards`` real shard servers (each in its own
process, as in a cluster), then verifies one query's local features against all of them
``--repeat`` times each way, interleaved:

* broker: GetFeatures of every candidate (batches of 32, all shards at once), then match + fit
  in the broker process on a ``--threads`` pool (``BrokerConfig.verify_on="broker"``);
* shards: one ``Shard.Verify`` call per shard, each shard matching and fitting its own
  candidates (``verify_on="shards"``, the default).

Reports the median wall time of the verify step per candidate each way, the ratio, and the
time each shard process spends in its ``Shard.Verify`` of the same timed call
(``ShardVerifyResponse.seconds`` as the pipeline records them, mean over the shards: the verify
work one shard process does). Each shard process sizes OpenCV's matching threads
as a shard actor does (the machine's CPUs shared by the shards). Both ways return the
same inliers (checked every run).

    env GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=4294967296 \\
        .venv/bin/python bench/shard_verify.py --shards 2 --candidates 100 --repeat 5
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import machine  # noqa: E402
from loupe.v1 import shard_pb2, shard_pb2_grpc  # noqa: E402
from services.broker.backends import GrpcShardClient  # noqa: E402
from services.broker.config import BrokerConfig  # noqa: E402
from services.broker.deadlines import Deadline  # noqa: E402
from services.broker.metrics import BrokerMetrics  # noqa: E402
from services.broker.search_pipeline import SearchPipeline  # noqa: E402
from services.broker.topk import Hit  # noqa: E402
from services.common.grpc_server import ServerOptions  # noqa: E402
from services.index.store import LocalStore, StoredImage  # noqa: E402
from services.rerank.verify import VerifyParams  # noqa: E402
from services.space.placement import Placement  # noqa: E402

N_KP, DIM = 1000, 40


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _views(rng: np.random.Generator, n: int, scene: tuple[np.ndarray, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` candidates: every third an affine view of the query's scene, the rest unrelated."""
    pts, desc = scene
    out = []
    for i in range(n):
        if i % 3 == 0:
            keep = rng.random(N_KP) < 0.3
            c_pts = pts[keep] @ np.array([[0.9, 0.1], [-0.05, 0.85]]).T + 20 + rng.normal(0, 2, (keep.sum(), 2))
            c_desc = _unit(desc[keep] + 0.3 * rng.normal(size=(keep.sum(), DIM)))
            fill = N_KP - keep.sum()
            c_pts = np.concatenate([c_pts, rng.uniform(0, 1024, (fill, 2))])
            c_desc = np.concatenate([c_desc, _unit(rng.normal(size=(fill, DIM)))])
        else:
            c_pts, c_desc = rng.uniform(0, 1024, (N_KP, 2)), _unit(rng.normal(size=(N_KP, DIM)))
        out.append((np.concatenate([c_pts, np.ones((N_KP, 2))], axis=1).astype(np.float32), c_desc))
    return out


def _serve_shard(shard_id: int, data_dir: str, images: list[StoredImage], ready: mp.Queue, stop: mp.Event, shards: int) -> None:
    import cv2

    from cluster.cpus import threads_per_member
    from services.index.servicer import create_server

    cv2.setNumThreads(threads_per_member(0, shards))  # as a shard actor sizes its matching threads (cluster.actors)

    running, servicer = create_server(shard_id, ServerOptions(host="127.0.0.1", port=0), data_dir=data_dir)
    servicer.index.add(images)
    ready.put(running.port)
    stop.wait()
    running.stop(0)
    servicer.index.close()


async def _measure(ports: list[int], hits: list[Hit], query, repeat: int, threads: int) -> dict:
    params = VerifyParams(min_inliers=16)
    clients = [GrpcShardClient(i, f"127.0.0.1:{p}", ServerOptions().channel_options()) for i, p in enumerate(ports)]
    pool = ThreadPoolExecutor(threads)
    metrics = BrokerMetrics.create()
    pipes = {w: SearchPipeline(None, clients, None, metrics, BrokerConfig(verify_on=w), pool) for w in ("broker", "shards")}
    times: dict[str, list[float]] = {"broker": [], "shards": []}
    shard_mean: list[float] = []
    reg = metrics.registry

    def shard_seconds() -> tuple[float, float]:  # the pipeline records each Shard.Verify answer's own seconds
        labels = {"stage": "verify_shard"}
        return (reg.get_sample_value("loupe_stage_duration_seconds_sum", labels) or 0.0,
                reg.get_sample_value("loupe_stage_duration_seconds_count", labels) or 0.0)

    try:
        for _ in range(repeat + 1):  # the first round warms both ways up and is not counted
            inliers = {}
            for where in ("broker", "shards"):
                before = shard_seconds()
                t0 = time.perf_counter()
                ranked = await pipes[where].verify(query, hits, params, Deadline(120.0, 120.0))
                times[where].append(time.perf_counter() - t0)
                inliers[where] = {v.hit.image_id: v.result.inliers for v in ranked if v.result is not None}
                if where == "shards":
                    after = shard_seconds()
                    shard_mean.append((after[0] - before[0]) / max(1.0, after[1] - before[1]))
            assert inliers["broker"] == inliers["shards"], "the two ways disagree"
    finally:
        for c in clients:
            await c.close()
        pool.shutdown()
    return {w: t[1:] for w, t in times.items()} | {"shard_mean": shard_mean[1:], "verified": sum(1 for n in inliers["shards"].values() if n >= 16)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--candidates", type=int, default=100, help="verified candidates per query (all shards together)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="broker verify pool (BrokerConfig.verify_threads)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 1024, (N_KP, 2))
    desc = _unit(rng.normal(size=(N_KP, DIM)))
    query = (np.concatenate([pts, np.ones((N_KP, 2))], axis=1).astype(np.float32), desc)
    views = _views(rng, args.candidates, (pts, desc))
    ids = [f"cand{i:05d}" for i in range(args.candidates)]
    per_shard: list[list[StoredImage]] = [[] for _ in range(args.shards)]
    placement = Placement(args.shards)
    for image_id, (kp, d) in zip(ids, views):
        vec = _unit(rng.normal(size=(1, 16)))[0]
        per_shard[placement.shard_of(image_id)].append(StoredImage(image_id, vec, None, LocalStore.quantize(kp, d), {}, 1024, 768))
    hits = [Hit(1.0 - i / 1000, image_id, placement.shard_of(image_id)) for i, image_id in enumerate(ids)]
    ctx = mp.get_context("spawn")
    stop, ready = ctx.Event(), ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_serve_shard, args=(i, f"{tmp}/shard-{i:03d}", per_shard[i], ready, stop, args.shards)) for i in range(args.shards)]
        for p in procs:
            p.start()
        ports = sorted(ready.get(timeout=120) for _ in procs)
        # ports arrive in start order only by chance: ask each shard its id
        ports = _ports_by_id(ports)
        load0 = os.getloadavg()
        res = asyncio.run(_measure(ports, hits, query, args.repeat, args.threads))
        load1 = os.getloadavg()
        stop.set()
        for p in procs:
            p.join(30)
    n = args.candidates
    b, s, mean = (statistics.median(res[k]) for k in ("broker", "shards", "shard_mean"))
    print(f"# {machine()}; load average {load0[0]:.2f} -> {load1[0]:.2f}; {args.shards} shard processes, "
          f"{n} candidates ({res['verified']} verify), {args.repeat} runs (median), broker pool {args.threads} threads")
    print("| way | verify step ms | ms per candidate | each shard process's own ms (mean, same call) |")
    print("|---|---:|---:|---:|")
    print(f"| broker (GetFeatures + match/fit in the broker) | {1e3 * b:.1f} | {1e3 * b / n:.2f} | — |")
    print(f"| shards (Shard.Verify) | {1e3 * s:.1f} | {1e3 * s / n:.2f} | {1e3 * mean:.1f} |")
    print(f"ratio broker / shards: {b / s:.2f}x")


def _ports_by_id(ports: list[int]) -> list[int]:
    import grpc

    by_id = {}
    for port in ports:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            by_id[shard_pb2_grpc.ShardStub(ch).Stats(shard_pb2.ShardStatsRequest(), timeout=30).shard_id] = port
    return [by_id[i] for i in range(len(ports))]


if __name__ == "__main__":
    main()
