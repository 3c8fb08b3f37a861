"""Resharding (issue 25): the share of records a placement moves when a shard is added or removed,
and the time a live reshard takes on real shard processes.

1. **Share moved** (placement only, ``--ids`` ids): S → S+1 and S+1 → S shards for S = 1..7, under
   the bucket rule (``buckets4096-hrw-v2``: fixed virtual buckets, rendezvous hashing) and the
   legacy one (``blake2b64-mod-v1``: digest mod S).
2. **Reshard time**: ``--shards`` shard processes (``python -m services.index``: gRPC on
   127.0.0.1, LMDB with fsync, faiss) filled with ``--images`` synthetic records (the records of
   ``bench/backup.py``: 512-d global, 5 regional vectors, ``--local`` local features, metadata),
   then resharded to ``--shards`` + 1 and back by the code the broker's Reshard rpc runs
   (``services.broker.resharding.Resharder``; new shards are new processes), ``--repeat`` times;
   no concurrent load. Reported: seconds per reshard, per 10k records moved and per 10k records of
   the collection (median of the runs).

    .venv/bin/python bench/reshard.py [--images 5000] [--local 500] [--shards 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from typing import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import ShardProcess, machine  # noqa: E402
from bench.backup import CHANNEL, fill  # noqa: E402
from loupe.v1 import retrieval_pb2  # noqa: E402
from services.broker.backends import GrpcShardClient  # noqa: E402
from services.broker.collection_model import CollectionModel  # noqa: E402
from services.broker.resharding import Resharder  # noqa: E402
from services.broker.routing import Routing  # noqa: E402
from services.broker.versions import VersionClock  # noqa: E402
from services.space.placement import LEGACY_PLACEMENT, PLACEMENT_VERSION, Placement  # noqa: E402


def moved_share(ids: Sequence[str], a: Placement, b: Placement) -> float:
    return sum(a.shard_of(i) != b.shard_of(i) for i in ids) / len(ids)


class ProcessFleet:
    """New shards are new shard processes in ``tmp`` (what ``cluster.shard_fleet`` does with Ray actors)."""

    def __init__(self, tmp: str, procs: list[ShardProcess]) -> None:
        self.tmp = tmp
        self.procs = {i: p for i, p in enumerate(procs)}

    async def start(self, shards, placement):
        for i in shards:
            self.procs[i] = ShardProcess(tempfile.mkdtemp(dir=self.tmp), i)
        return [[self.procs[i].address] for i in shards]

    async def record_layout(self, placement: Placement) -> None:
        pass

    async def stop(self, shards) -> None:
        for i in shards:
            self.procs.pop(i).stop()


async def timed_reshards(args: argparse.Namespace) -> list[tuple[str, float, int]]:
    out = []
    with tempfile.TemporaryDirectory(prefix="loupe-bench-reshard-") as tmp:
        procs = [ShardProcess(tempfile.mkdtemp(dir=tmp), i) for i in range(args.shards)]
        clients = [GrpcShardClient(i, p.address, CHANNEL) for i, p in enumerate(procs)]
        clock = VersionClock()
        t0 = time.perf_counter()
        await fill(clients, range(args.images), args.local, clock)
        print(f"filled {args.shards} shards with {args.images} images ({args.local} local features each) in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        fleet = ProcessFleet(tmp, procs)
        routing = Routing(Placement(args.shards))
        lock = asyncio.Lock()
        resharder = Resharder(clients, routing, clock, CollectionModel(""), lambda: lock, fleet,
                              lambda i, addrs: GrpcShardClient(i, addrs[0], CHANNEL))
        for _ in range(args.repeat):
            for target in (args.shards + 1, args.shards):
                r = await resharder.reshard(retrieval_pb2.ReshardRequest(shards=target))
                counts = [(await c.stats(30.0)).images for c in clients]
                assert sum(counts) == args.images, counts
                what = f"{r.from_shards} → {r.to_shards}"
                out.append((what, r.seconds, r.records_moved))
                print(f"{what}: {r.seconds:.2f} s ({r.copy_seconds:.2f} s copying), {r.records_moved} moved, "
                      f"{r.copies_removed} removed; per shard {counts}", flush=True)
        for c in clients:
            await c.close()
        for p in fleet.procs.values():
            p.stop()
    return out


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--local", type=int, default=500, help="local features per image (40-D float16)")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ids", type=int, default=100_000)
    args = ap.parse_args()
    print(f"# {machine()}; load average {os.getloadavg()[0]:.2f}", flush=True)
    ids = [f"img-{i:07d}" for i in range(args.ids)]
    print("| shards | ideal | bucket rule, add | bucket rule, remove | legacy, add | legacy, remove |")
    print("|---|---:|---:|---:|---:|---:|")
    for s in range(1, 8):
        rows = [moved_share(ids, Placement(a, rule), Placement(b, rule)) for rule in (PLACEMENT_VERSION, LEGACY_PLACEMENT)
                for a, b in ((s, s + 1), (s + 1, s))]
        print(f"| {s} ↔ {s + 1} | {1 / (s + 1):.3f} | " + " | ".join(f"{x:.3f}" for x in rows) + " |", flush=True)
    runs = await timed_reshards(args)
    print(f"# load average {os.getloadavg()[0]:.2f}")
    print("| reshard | runs | median s | s per 10k moved | s per 10k in the collection | moved (median) |")
    print("|---|---:|---:|---:|---:|---:|")
    for what in dict.fromkeys(w for w, _, _ in runs):
        secs = [s for w, s, _ in runs if w == what]
        moved = statistics.median(m for w, _, m in runs if w == what)
        med = statistics.median(secs)
        print(f"| {what} | {len(secs)} | {med:.2f} | {med / moved * 1e4:.1f} | {med / args.images * 1e4:.1f} | {moved:.0f} "
              f"({moved / args.images:.1%}) |")


if __name__ == "__main__":
    asyncio.run(main())
