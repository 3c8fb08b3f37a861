"""Diffusion rerank cost per query at R = 1000 and 5000, beside plain faiss search (same run).

Synthetic clustered descriptors (D=1280, L2-normalised) stand in for a collection, so the
script runs anywhere. Per query: plain top-R faiss search, then the broker's diffusion stage
(`services.rerank.diffusion.diffusion_rerank`) two ways: with the neighbourhood's kNN graph
built per query (online, O(R^2 D)), and with it taken from the collection's offline kNN graph
(`services.rerank.graph.CollectionGraph`, built once; its build time is reported). Also the
regional variant (5 regional vectors per image, as the extractor stores them), both ways.

    .venv/bin/python bench/diffusion.py [--queries 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import faiss
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import machine  # noqa: E402
from services.rerank.diffusion import diffusion_rerank  # noqa: E402
from services.rerank.diffusion import DiffusionParams  # noqa: E402
from services.rerank.graph import CollectionGraph  # noqa: E402


def clustered(rng: np.random.Generator, n: int, d: int = 1280, clusters: int = 200, noise: float = 0.8) -> np.ndarray:
    centres = rng.normal(size=(clusters, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, clusters, n)] + noise / np.sqrt(d) * rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def stats(ms: list[float]) -> str:
    a = np.asarray(ms)
    return f"median {np.median(a):8.2f} ms  p99 {np.percentile(a, 99):8.2f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--database", type=int, default=20000)
    args = ap.parse_args()
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    db = clustered(rng, args.database)
    index = faiss.IndexFlatIP(db.shape[1])
    index.add(db)
    queries = db[rng.choice(len(db), args.queries, replace=False)] + 0.02 * rng.normal(size=(args.queries, db.shape[1])).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    print(f"machine: {machine()}; database {len(db)} x {db.shape[1]}, {args.queries} queries, {args.threads} threads")
    params = DiffusionParams(k=50, kq=10, alpha=0.99, gamma=3.0)
    ids_all = [f"img{i}" for i in range(len(db))]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    graph = CollectionGraph.build(ids_all, db, k=params.k)
    print(f"collection graph: {len(db)} images, k={graph.k}, built in {time.perf_counter() - t0:.1f} s, "
          f"{graph.nbytes / 2**20:.1f} MiB, RSS growth {(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024:.0f} MiB")
    for R in (1000, 5000):
        t_search, t_online, t_graph, iters, same_top = [], [], [], [], []
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for q in queries:
            t0 = time.perf_counter()
            _, ids = index.search(q[None, :], R)
            t1 = time.perf_counter()
            online = diffusion_rerank(q, db[ids[0]], None, R, params)
            t2 = time.perf_counter()
            vecs = db[ids[0]]
            edges = graph.neighbourhood_lists([ids_all[i] for i in ids[0]], vecs, params.k)
            offline = diffusion_rerank(q, vecs, None, R, params, edges=edges)
            t3 = time.perf_counter()
            t_search.append((t1 - t0) * 1e3)
            t_online.append((t2 - t1) * 1e3)
            t_graph.append((t3 - t2) * 1e3)
            iters.append(offline.iterations)
            same_top.append(len(set(np.argsort(-online.scores)[:10]) & set(np.argsort(-offline.scores)[:10])) / 10)
        rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
        print(f"R={R:5d} plain search: {stats(t_search)} | diffusion, online graph: {stats(t_online)} | "
              f"diffusion, collection graph: {stats(t_graph)} | CG iterations median {int(np.median(iters))} max {max(iters)} | "
              f"top-10 overlap online vs graph {np.mean(same_top):.2f} | max RSS growth {rss:.0f} MiB | "
              f"collection graph / search {np.median(t_graph) / np.median(t_search):.1f}x, online / graph "
              f"{np.median(t_online) / np.median(t_graph):.1f}x")
    # Regional: every image keeps 5 regional vectors (the extractor's k-means centroids); the
    # query's 5 regions seed jointly. Online graph over the R*5 nodes vs the collection's
    # regional graph (built once over all N*5 nodes).
    rp = DiffusionParams(k=50, kq=10, alpha=0.99, gamma=3.0, aggregate="max")
    n_sub = min(len(db), 4000)
    regions = np.repeat(db[:n_sub], 5, axis=0) + 0.3 / np.sqrt(db.shape[1]) * rng.normal(size=(n_sub * 5, db.shape[1])).astype(np.float32)
    regions /= np.linalg.norm(regions, axis=1, keepdims=True)
    node_ids = [f"img{i}#{j}" for i in range(n_sub) for j in range(5)]
    t0 = time.perf_counter()
    rgraph = CollectionGraph.build(node_ids, regions, k=rp.k)
    print(f"regional collection graph: {n_sub} images x 5 regions = {len(node_ids)} nodes, built in {time.perf_counter() - t0:.1f} s, {rgraph.nbytes / 2**20:.1f} MiB")
    sub_index = faiss.IndexFlatIP(db.shape[1])
    sub_index.add(db[:n_sub])
    for R in (200, 1000):
        t_online, t_graph, iters = [], [], []
        for q in queries[: max(3, args.queries // 2)]:
            _, ids = sub_index.search(q[None, :], R)
            rows = (ids[0][:, None] * 5 + np.arange(5)).ravel()
            nodes, owner = regions[rows], np.repeat(np.arange(R), 5)
            qr = regions[rows[:5]]  # a query seen through 5 regions of its nearest image
            t0 = time.perf_counter()
            diffusion_rerank(qr, nodes, owner, R, rp)
            t1 = time.perf_counter()
            edges = rgraph.neighbourhood_lists([node_ids[r] for r in rows], nodes, rp.k)
            out = diffusion_rerank(qr, nodes, owner, R, rp, edges=edges)
            t_graph.append((time.perf_counter() - t1) * 1e3)
            t_online.append((t1 - t0) * 1e3)
            iters.append(out.iterations)
        print(f"R={R:5d} regional (5 regions/image, {R * 5} nodes): online graph {stats(t_online)} | collection graph "
              f"{stats(t_graph)} | CG iterations median {int(np.median(iters))} | online / graph {np.median(t_online) / np.median(t_graph):.1f}x")


if __name__ == "__main__":
    main()
