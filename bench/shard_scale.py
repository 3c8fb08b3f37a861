"""One shard at scale: RAM and disk per image, write throughput, restart time, search latency,
QPS and recall@100 of the approximate index against exact search.

The shard runs as its own process (``python -m services.index``) and is driven over gRPC, as
the broker drives it; RAM is that process's resident memory (anonymous = heap + faiss index;
file = pages of the LMDB map it touched, reclaimable page cache).

Vectors follow the distribution of real loupe descriptors: the served global descriptor (R-MAC,
3 scales, 512 px) of the 996 ROxford-subset database images is extracted once (cached in
``--cache``); each synthetic vector is a real one plus Gaussian noise with the real
descriptors' covariance, scaled by U(0.3, 1.0), L2-normalised. Queries are the 9 real ROxford
queries' descriptors plus perturbed real vectors the collection never saw. Without
../shared/data the seeds are a 64-cluster Gaussian mixture (said in the output).

    .venv/bin/python bench/shard_scale.py --images 1000000 --global-only
    .venv/bin/python bench/shard_scale.py --images 100000             # full records

Results go to BENCHMARKS.md ("Shard at scale").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import REPO_ROOT, ROXFORD, load_as_served, machine  # noqa: E402
from loupe.tensors import to_tensor  # noqa: E402
from loupe.v1 import shard_pb2, shard_pb2_grpc, types_pb2  # noqa: E402

D = 1280
CHUNK = 20_000


def real_seeds(cache: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(n, D) real database descriptors and (q, D) real query descriptors, with a description."""
    if os.path.exists(cache):
        z = np.load(cache)
        return z["db"], z["q"], "ROxford-subset served global descriptors (cached)"
    if not (ROXFORD / "gnd_roxford5k_subset.pkl").exists():
        rng = np.random.default_rng(1)
        centers = rng.standard_normal((64, D)).astype(np.float32)
        x = centers[rng.integers(0, 64, 1000)] + 0.5 * rng.standard_normal((1000, D)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x[:991], x[991:], "64-cluster Gaussian mixture (../shared/data absent)"
    from services.eval.ground_truth import load_ground_truth
    from services.extractor.backbone import load_backbone
    from services.extractor.global_descriptor import GlobalConfig, GlobalExtractor

    gt = load_ground_truth(ROXFORD / "gnd_roxford5k_subset.pkl")
    ext = GlobalExtractor(load_backbone(), GlobalConfig(pooling="rmac", max_side=512))

    def run(names: list[str], boxes: list | None) -> np.ndarray:
        out = []
        for i, n in enumerate(names):
            data = (ROXFORD / "jpg" / f"{n}.jpg").read_bytes()
            out.append(ext.extract(load_as_served(data, boxes[i] if boxes else None, 512)).vector)
            if (i + 1) % 200 == 0:
                print(f"  extracted {i + 1}/{len(names)}", file=sys.stderr, flush=True)
        return np.stack(out).astype(np.float32)

    db = run(gt.imlist, None)
    q = run(gt.qimlist, [g["bbx"] for g in gt.gnd])
    np.savez(cache, db=db, q=q)
    return db, q, "ROxford-subset served global descriptors"


class Synth:
    """Deterministic synthetic vectors around real seeds, generated chunk by chunk."""

    def __init__(self, seeds: np.ndarray) -> None:
        self.seeds = seeds
        centred = seeds - seeds.mean(0)
        # noise with the seeds' covariance: x = centred^T z / sqrt(n)
        self.basis = centred / np.sqrt(len(seeds))

    def chunk(self, start: int, n: int, salt: int = 0) -> np.ndarray:
        rng = np.random.default_rng([start, salt])
        s = self.seeds[rng.integers(0, len(self.seeds), n)]
        noise = rng.standard_normal((n, len(self.seeds))).astype(np.float32) @ self.basis
        x = s + rng.uniform(0.3, 1.0, (n, 1)).astype(np.float32) * noise
        return x / np.linalg.norm(x, axis=1, keepdims=True)


def proc_mem(pid: int) -> dict[str, float]:
    out = {}
    for line in open(f"/proc/{pid}/status"):
        key, _, val = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(val.split()[0]) * 1024 / 1e6
    return out


def du_mb(path: str) -> float:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.stat(os.path.join(root, f)).st_blocks * 512
    return total / 1e6


class Shard:
    def __init__(self, data_dir: str, approx_min: int) -> None:
        self.data_dir, self.approx_min = data_dir, approx_min

    def start(self) -> float:
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.index", "--data-dir", self.data_dir, "--approx-min-images", str(self.approx_min)],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=open(os.path.join(os.path.dirname(self.data_dir), "shard.log"), "ab"),
        )
        info = json.loads(self.proc.stdout.readline())
        self.startup = info["startup"]
        self.channel = grpc.insecure_channel(info["address"], options=[("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)])
        self.stub = shard_pb2_grpc.ShardStub(self.channel)
        grpc.channel_ready_future(self.channel).result(timeout=600)
        return time.perf_counter() - t0

    def stats(self) -> shard_pb2.ShardStatsResponse:
        return self.stub.Stats(shard_pb2.ShardStatsRequest(shard_id=0), timeout=60)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=600)
        self.channel.close()


def records(vecs: np.ndarray, start: int, full: bool, rng: np.random.Generator) -> list[shard_pb2.ShardRecord]:
    out = []
    for i, v in enumerate(vecs):
        f = types_pb2.ImageFeatures(width=1024, height=768)
        f.__getattribute__("global").CopyFrom(to_tensor(v))
        if full:
            f.regional.CopyFrom(to_tensor((v[None, :] + 0.05 * rng.standard_normal((5, D))).astype(np.float16)))
            f.local.keypoints.CopyFrom(to_tensor((rng.random((1000, 4)) * 1000).astype(np.float16)))
            f.local.descriptors.CopyFrom(to_tensor(rng.integers(-127, 127, (1000, 40), dtype=np.int8), scale=1 / 127))
        out.append(shard_pb2.ShardRecord(id=f"img-{start + i:08d}", features=f, metadata={"n": str(start + i)}))
    return out


def exact_top(synth: Synth, n: int, queries: np.ndarray, k: int) -> np.ndarray:
    """(q, k) indices of the exact top-k over the n generated vectors."""
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    for start in range(0, n, CHUNK):
        x = synth.chunk(start, min(CHUNK, n - start))
        s = queries @ x.T
        i = np.broadcast_to(np.arange(start, start + len(x)), s.shape)
        cs, ci = np.concatenate([best_s, s], 1), np.concatenate([best_i, i], 1)
        top = np.argpartition(-cs, k - 1, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(cs, top, 1), np.take_along_axis(ci, top, 1)
    return best_i


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--global-only", action="store_true", help="records hold only the global vector")
    ap.add_argument("--approx-min-images", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--batch", type=int, default=256, help="records per Add (one durable commit)")
    ap.add_argument("--writers", type=int, default=2, help="concurrent Add streams")
    ap.add_argument("--cache", default="/tmp/loupe-roxford-global-512.npz")
    ap.add_argument("--dir", default=None, help="where the shard directory goes (default: a temp dir, removed)")
    args = ap.parse_args()
    seeds, real_q, source = real_seeds(args.cache)
    synth = Synth(seeds)
    queries = np.concatenate([real_q, synth.chunk(10**9, args.queries - len(real_q), salt=1)])
    root = tempfile.mkdtemp(prefix="loupe-scale-", dir=args.dir)
    shard = Shard(os.path.join(root, "shard"), args.approx_min_images)
    print(f"machine: {machine()}; load average {os.getloadavg()}; vectors: {source}; {args.images} images, "
          f"{'global-only' if args.global_only else 'full (global + 5 regional + 1000 local)'} records", flush=True)
    try:
        shard.start()
        t0 = time.perf_counter()
        lock = threading.Lock()
        done = [0]

        def write(start: int) -> None:
            n = min(CHUNK, args.images - start)
            x = synth.chunk(start, n)
            rng = np.random.default_rng(start)
            for b in range(0, n, args.batch):
                recs = records(x[b : b + args.batch], start + b, not args.global_only, rng)
                shard.stub.Add(shard_pb2.ShardAddRequest(shard_id=0, records=recs), timeout=600)
                with lock:
                    done[0] += len(recs)

        with ThreadPoolExecutor(args.writers) as pool:
            for f in [pool.submit(write, s) for s in range(0, args.images, CHUNK)]:
                f.result()
        write_s = time.perf_counter() - t0
        print(f"write: {args.images / write_s:,.0f} images/s acknowledged ({write_s:.0f} s, batches of {args.batch}, {args.writers} writers)", flush=True)
        t0 = time.perf_counter()
        while args.images >= args.approx_min_images > 0 and shard.stats().index == "Flat":
            time.sleep(2)
        st = shard.stats()
        build_s = time.perf_counter() - t0
        print(f"index: {st.index} (approximate index ready {build_s:.0f} s after the last write); "
              f"index RAM {st.index_bytes / 1e6:.1f} MB; store {st.store_bytes / 1e6:,.0f} MB", flush=True)
        mem = proc_mem(shard.proc.pid)
        lat = []
        got = []
        for q in queries:
            t = time.perf_counter()
            r = shard.stub.Search(shard_pb2.ShardSearchRequest(shard_id=0, query=to_tensor(q), top_k=100), timeout=60)
            lat.append(time.perf_counter() - t)
            got.append([int(i[4:]) for i in r.ids])
        lat_ms = 1e3 * np.asarray(lat)

        def one(q: np.ndarray) -> None:
            shard.stub.Search(shard_pb2.ShardSearchRequest(shard_id=0, query=to_tensor(q), top_k=100), timeout=60)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, queries))
        qps_conc = len(queries) / (time.perf_counter() - t0)
        mem_after = proc_mem(shard.proc.pid)
        truth = exact_top(synth, args.images, queries, 100)
        recall = float(np.mean([len(set(g) & set(t.tolist())) / 100 for g, t in zip(got, truth)]))
        shard.stop()
        restart = shard.start()
        st2 = shard.stats()
        for q in queries[:50]:
            one(q)
        mem_restarted = proc_mem(shard.proc.pid)
        shard.stop()
        disk = du_mb(shard.data_dir)
        n = args.images
        print(json.dumps({
            "images": n, "records": "global-only" if args.global_only else "full", "index": st.index,
            "write_images_per_s": round(n / write_s), "approx_build_s_after_writes": round(build_s, 1),
            "search_p50_ms": round(float(np.median(lat_ms)), 2), "search_p99_ms": round(float(np.percentile(lat_ms, 99)), 2),
            "qps_sequential": round(len(queries) / (lat_ms.sum() / 1e3), 1), "qps_8_concurrent": round(qps_conc, 1),
            "recall_at_100": round(recall, 4),
            "rss_mb": round(mem_after["VmRSS"], 1), "rss_anon_mb": round(mem_after["RssAnon"], 1), "rss_file_mb": round(mem_after["RssFile"], 1),
            "rss_anon_before_search_mb": round(mem["RssAnon"], 1),
            "ram_anon_bytes_per_image": round(mem_after["RssAnon"] * 1e6 / n, 1),
            "index_bytes_per_image": round(st.index_bytes / n, 1),
            "disk_mb": round(disk, 1), "disk_bytes_per_image": round(disk * 1e6 / n),
            "restarted_rss_anon_mb": round(mem_restarted["RssAnon"], 1), "restarted_rss_file_mb": round(mem_restarted["RssFile"], 1),
            "restart_s": round(restart, 2), "restart_index_load_s": round(st2.startup_seconds, 2), "restart_replayed": st2.startup_replayed,
            "load_average": os.getloadavg(),
        }), flush=True)
    finally:
        if shard.proc.poll() is None:
            shard.proc.kill()
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
