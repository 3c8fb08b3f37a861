"""Replicated shards (issue 22): write latency at replication 1 vs 2, catch-up times, and shard
searches with one replica hung, hedging on and off — all in one process run, on real shard
processes (``python -m services.index``: gRPC on 127.0.0.1, LMDB with fsync, faiss) driven by the
broker's own ``ReplicatedShard``.

1. **Writes**: ``--writes`` sequential one-image writes (a 512-d global vector, 5 regional
   vectors, ``--local`` local features of 128 dims, metadata) through ``ReplicatedShard.add``
   with 1 replica, then with 2 (quorum majority = both). p50 / p99 ms.
2. **Catch-up, behind**: replica B misses ``--behind`` writes (it is stopped while they go to A
   with quorum 1), then the broker's merge brings it back; seconds, and ids compared/copied.
3. **Catch-up, empty**: A holds ``--shard-images`` images (global + regional, no local features:
   what fits this machine's disk and time), B is a new empty replica; seconds to copy the shard.
4. **Hung replica**: ``--queries`` searches (k=100, budget ``--budget`` s each) with both replicas
   healthy, then with B stopped (SIGSTOP), with hedging after ``--hedge`` s and with hedging off
   (fail over only on an error). p50 / p99 ms and misses (searches that found no answer).

    .venv/bin/python bench/replication.py [--writes 300] [--behind 10000] [--shard-images 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import ShardProcess, machine  # noqa: E402
from loupe.tensors import to_tensor  # noqa: E402
from loupe.v1 import shard_pb2, types_pb2  # noqa: E402
from services.broker.backends import GrpcShardClient  # noqa: E402
from services.broker.catch_up import merge  # noqa: E402
from services.broker.replicas import ReplicatedShard  # noqa: E402
from services.broker.versions import VersionClock  # noqa: E402
from services.common.grpc_server import ServerOptions  # noqa: E402

D = 512
CHANNEL = ServerOptions().channel_options()  # the broker's message limits (64 MiB), as its own channels have


def record(i: int, rng: np.random.Generator, local: int, version: int) -> shard_pb2.ShardRecord:
    v = rng.standard_normal(D).astype(np.float32)
    reg = rng.standard_normal((5, D)).astype(np.float32)
    f = types_pb2.ImageFeatures(width=640, height=480)
    f.__getattribute__("global").CopyFrom(to_tensor(v / np.linalg.norm(v)))
    f.regional.CopyFrom(to_tensor((reg / np.linalg.norm(reg, axis=1, keepdims=True)).astype(np.float16)))
    if local:
        f.local.keypoints.CopyFrom(to_tensor((rng.random((local, 4)) * 500).astype(np.float16)))
        f.local.descriptors.CopyFrom(to_tensor(rng.integers(-127, 128, (local, 128), dtype=np.int8), scale=1 / 127))
    return shard_pb2.ShardRecord(id=f"img-{i:07d}", features=f, metadata={"n": str(i)}, version=version)


def pct(xs: list[float]) -> str:
    return f"p50 {np.percentile(xs, 50):7.2f} ms  p99 {np.percentile(xs, 99):7.2f} ms"


async def shard_over(procs: list[ShardProcess], quorum: str = "majority", hedge: float = 0.1) -> ReplicatedShard:
    shard = ReplicatedShard(0, [GrpcShardClient(0, p.address, CHANNEL) for p in procs], quorum, hedge)
    await shard.check(5.0)
    return shard


async def bench_writes(tmp: str, n: int, local: int) -> None:
    clock = VersionClock()
    rng = np.random.default_rng(0)
    recs = [record(i, rng, local, 0) for i in range(n)]
    for factor in (1, 2, 1, 2):
        procs = [ShardProcess(tempfile.mkdtemp(dir=tmp)) for _ in range(factor)]
        shard = await shard_over(procs)
        took = []
        for r in recs:
            r.version = clock.next()
            t0 = time.perf_counter()
            await shard.add(shard_pb2.ShardAddRequest(shard_id=0, records=[r]), 10.0)
            took.append((time.perf_counter() - t0) * 1e3)
        await shard.close()
        for p in procs:
            p.stop()
        print(f"writes, replication {factor}: {n} one-image writes ({local} local features)  {pct(took)}", flush=True)


async def fill(client: GrpcShardClient, start: int, n: int, local: int, clock: VersionClock, batch: int = 256) -> None:
    rng = np.random.default_rng(start)
    for s in range(start, start + n, batch):
        recs = [record(i, rng, local, clock.next()) for i in range(s, min(s + batch, start + n))]
        await client.add(shard_pb2.ShardAddRequest(shard_id=0, records=recs), 300.0)


async def bench_behind(tmp: str, behind: int, local: int) -> None:
    clock = VersionClock()
    a, b = ShardProcess(tempfile.mkdtemp(dir=tmp)), ShardProcess(tempfile.mkdtemp(dir=tmp))
    ca, cb = GrpcShardClient(0, a.address, CHANNEL), GrpcShardClient(0, b.address, CHANNEL)
    for c in (ca, cb):
        await fill(c, 0, 2000, local, VersionClock(now_ms=lambda: 1))  # what both hold (same versions)
    await fill(ca, 2000, behind, local, clock)  # what B missed
    t0 = time.perf_counter()
    report = await merge(0, ca, cb)
    took = time.perf_counter() - t0
    sa, sb = await ca.stats(10.0), await cb.stats(10.0)
    assert sa.digest == sb.digest, "digests differ after the merge"
    print(f"catch-up, {behind} writes behind (of {2000 + behind} images, {local} local features each): {took:.1f} s, "
          f"{report.compared} ids compared, {report.records_to_b} records copied, digests equal", flush=True)
    for c in (ca, cb):
        await c.close()
    a.stop()
    b.stop()


async def bench_empty(tmp: str, images: int) -> None:
    a, b = ShardProcess(tempfile.mkdtemp(dir=tmp)), ShardProcess(tempfile.mkdtemp(dir=tmp))
    ca, cb = GrpcShardClient(0, a.address, CHANNEL), GrpcShardClient(0, b.address, CHANNEL)
    t0 = time.perf_counter()
    await fill(ca, 0, images, 0, VersionClock(), batch=1000)
    print(f"  (filled {images} images in {time.perf_counter() - t0:.0f} s)", flush=True)
    t0 = time.perf_counter()
    report = await merge(0, ca, cb)
    took = time.perf_counter() - t0
    sa, sb = await ca.stats(30.0), await cb.stats(30.0)
    assert sa.digest == sb.digest and sb.images == images, "copy incomplete"
    print(f"catch-up, empty replica of a {images}-image shard (global + 5 regional, no local features): {took:.1f} s "
          f"({images / took:.0f} images/s), {report.records_to_b} records copied, digests equal", flush=True)
    for c in (ca, cb):
        await c.close()
    a.stop()
    b.stop()


async def bench_hung(tmp: str, queries: int, budget: float, hedge: float) -> None:
    procs = [ShardProcess(tempfile.mkdtemp(dir=tmp)) for _ in range(2)]
    clients = [GrpcShardClient(0, p.address, CHANNEL) for p in procs]
    for c in clients:
        await fill(c, 0, 5000, 0, VersionClock(now_ms=lambda: 1))  # the same versions on both: in sync
    rng = np.random.default_rng(1)
    qs = [rng.standard_normal(D).astype(np.float32) for _ in range(queries)]
    for label, h in (("hedge", hedge), ("no hedge", 0.0)):
        shard = ReplicatedShard(0, [GrpcShardClient(0, p.address, CHANNEL) for p in procs], "majority", h)
        await shard.check(5.0)
        for phase in ("healthy", "B hung"):
            if phase == "B hung":
                procs[1].pause()
            took, missed = [], 0
            for q in qs:
                q = q / np.linalg.norm(q)
                t0 = time.perf_counter()
                try:
                    await shard.search(shard_pb2.ShardSearchRequest(shard_id=0, query=to_tensor(q), top_k=100), budget)
                    took.append((time.perf_counter() - t0) * 1e3)
                except Exception:
                    missed += 1
            if phase == "B hung":
                procs[1].resume()
            summary = pct(took) if took else "no answer"
            print(f"searches, {label} ({h:g} s), {phase}: {queries} searches, budget {budget:g} s  {summary}  missed {missed}", flush=True)
        await shard.close()
    for c in clients:
        await c.close()
    for p in procs:
        p.stop()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--writes", type=int, default=300)
    ap.add_argument("--local", type=int, default=300, help="local features per image in the write and 'behind' benches")
    ap.add_argument("--behind", type=int, default=10_000)
    ap.add_argument("--shard-images", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=60)
    ap.add_argument("--budget", type=float, default=2.0)
    ap.add_argument("--hedge", type=float, default=0.1)
    ap.add_argument("--only", default="writes,behind,empty,hung")
    args = ap.parse_args()
    print(f"# {machine()}; load average {os.getloadavg()[0]:.2f}", flush=True)
    only = set(args.only.split(","))
    with tempfile.TemporaryDirectory(prefix="loupe-bench-repl-") as tmp:
        if "writes" in only:
            await bench_writes(tmp, args.writes, args.local)
        if "behind" in only:
            await bench_behind(tmp, args.behind, args.local)
        if "empty" in only:
            await bench_empty(tmp, args.shard_images)
        if "hung" in only:
            await bench_hung(tmp, args.queries, args.budget, args.hedge)
    print(f"# load average at the end {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
