"""Backup and restore (issue 25): time, throughput and size on real shard processes
(``python -m services.index``: gRPC on 127.0.0.1, LMDB with fsync, faiss), driven by the same
code the broker's Backup and Restore rpcs run (``services.backup``), to a directory and to an S3
server process on loopback (moto's server mode: a Python S3 implementation, slower than a real
object store — an upper bound of the S3 path's own cost, not of S3's).

1. Fill ``--shards`` source shards with ``--images`` synthetic records (a 512-d global vector, 5
   regional vectors, ``--local`` local features of 40 dims as float16, metadata), written
   straight to the shard processes with versions.
2. Full backup to a directory; an incremental one with nothing changed; one after ``--changed``
   of the records were rewritten. Then a full backup to S3.
3. Restore the directory backup into ``--target-shards`` new shard processes (verification, then
   writing), and the S3 one into another set; check every record arrived (counts, digests of the
   re-placed ids are not comparable across shard counts: counts and a spot check of records).

    .venv/bin/python bench/backup.py [--images 5000] [--local 500] [--shards 2] [--target-shards 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import ShardProcess, machine  # noqa: E402
from loupe.tensors import to_tensor  # noqa: E402
from loupe.v1 import shard_pb2, types_pb2  # noqa: E402
from services.backup import restore as restoring  # noqa: E402
from services.backup.storage import open_storage  # noqa: E402
from services.backup.take import BackupSettings, take_backup  # noqa: E402
from services.broker.backends import GrpcShardClient  # noqa: E402
from services.broker.versions import VersionClock  # noqa: E402
from services.common.grpc_server import ServerOptions  # noqa: E402
from services.space.placement import Placement  # noqa: E402

D = 512
CHANNEL = ServerOptions().channel_options()  # the broker's message limits (64 MiB), not gRPC's 4 MiB default


def record(i: int, rng: np.random.Generator, local: int, version: int) -> shard_pb2.ShardRecord:
    v = rng.standard_normal(D).astype(np.float32)
    reg = rng.standard_normal((5, D)).astype(np.float32)
    f = types_pb2.ImageFeatures(width=640, height=480)
    f.__getattribute__("global").CopyFrom(to_tensor(v / np.linalg.norm(v)))
    f.regional.CopyFrom(to_tensor((reg / np.linalg.norm(reg, axis=1, keepdims=True)).astype(np.float16)))
    if local:
        f.local.keypoints.CopyFrom(to_tensor((rng.random((local, 4)) * 500).astype(np.float16)))
        d = rng.standard_normal((local, 40)).astype(np.float32)
        f.local.descriptors.CopyFrom(to_tensor((d / np.linalg.norm(d, axis=1, keepdims=True)).astype(np.float16)))
    return shard_pb2.ShardRecord(id=f"img-{i:07d}", features=f, metadata={"n": str(i)}, version=version)


async def fill(clients: list[GrpcShardClient], ids: range, local: int, clock: VersionClock, seed: int = 0, batch: int = 64) -> None:
    rng = np.random.default_rng(seed)
    for s in range(ids.start, ids.stop, batch):
        by: dict[int, list[shard_pb2.ShardRecord]] = {}
        version = clock.next()
        for i in range(s, min(s + batch, ids.stop)):
            r = record(i, rng, local, version)
            by.setdefault(Placement(len(clients)).shard_of(r.id), []).append(r)
        await asyncio.gather(*(clients[sid].add(shard_pb2.ShardAddRequest(shard_id=sid, records=recs), 300.0) for sid, recs in by.items()))


async def run(fn, *args):
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def size_of(path: str) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


class MotoServer:
    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                           "AWS_DEFAULT_REGION": "us-east-1"})
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        import boto3

        boto3.client("s3").create_bucket(Bucket="bench")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


async def backup(url: str, clients, full: bool = False):
    t0 = time.perf_counter()
    m = await take_backup(await run(open_storage, url), clients, {}, started_version=0, layout={"shards": len(clients)}, model={},
                          run=run, settings=BackupSettings(full=full))
    return m, time.perf_counter() - t0


async def restore(url: str, tmp: str, target_shards: int) -> tuple[float, float, list[int]]:
    procs = [ShardProcess(tempfile.mkdtemp(dir=tmp), i) for i in range(target_shards)]
    clients = [GrpcShardClient(i, p.address, CHANNEL) for i, p in enumerate(procs)]
    storage = await run(open_storage, url)
    t0 = time.perf_counter()
    m = await run(restoring.resolve, storage, "")
    await restoring.verify(storage, m, run)
    t1 = time.perf_counter()
    await restoring.write_records(storage, m, clients, run, restoring.WriteProgress())
    t2 = time.perf_counter()
    counts = [(await c.stats(30.0)).images for c in clients]
    for c in clients:
        await c.close()
    for p in procs:
        p.stop()
    return t1 - t0, t2 - t1, counts


def line(what: str, n: int, seconds: float, nbytes: int | None = None) -> str:
    size = f", {nbytes / 1e6:.1f} MB ({nbytes / n * 1e4 / 1e9:.2f} GB per 10k images)" if nbytes is not None else ""
    return f"{what}: {seconds:.2f} s ({n / seconds:.0f} images/s, {seconds / n * 1e4:.0f} s per 10k images){size}"


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--local", type=int, default=500, help="local features per image (40-D float16)")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--target-shards", type=int, default=3)
    ap.add_argument("--changed", type=float, default=0.01, help="share of the records rewritten before the second incremental backup")
    args = ap.parse_args()
    print(f"# {machine()}; load average {os.getloadavg()[0]:.2f}", flush=True)
    n = args.images
    with tempfile.TemporaryDirectory(prefix="loupe-bench-backup-") as tmp:
        procs = [ShardProcess(tempfile.mkdtemp(dir=tmp), i) for i in range(args.shards)]
        clients = [GrpcShardClient(i, p.address, CHANNEL) for i, p in enumerate(procs)]
        clock = VersionClock()
        t0 = time.perf_counter()
        await fill(clients, range(n), args.local, clock)
        store = sum([(await c.stats(30.0)).store_bytes for c in clients])
        print(f"filled {args.shards} shards with {n} images ({args.local} local features each) in {time.perf_counter() - t0:.0f} s; "
              f"stores {store / 1e6:.0f} MB", flush=True)
        directory = os.path.join(tmp, "backups")
        m, took = await backup(directory, clients)
        chunks = sum(len(s.chunks) for s in m.shards)
        print(line("directory, full backup", n, took, m.bytes) + f"; {chunks} chunks, avg {m.bytes / chunks / 1e6:.1f} MB", flush=True)
        m2, took = await backup(directory, clients)
        print(f"directory, incremental backup, nothing changed: {took:.2f} s, {m2.chunks_reused}/{chunks} chunks reused, "
              f"{m2.bytes_written / 1e6:.1f} MB written", flush=True)
        changed = max(1, int(n * args.changed))
        ids = np.random.default_rng(7).choice(n, changed, replace=False)
        for i in ids:  # rewritten one by one: new versions, new contents
            r = record(int(i), np.random.default_rng(int(i) + 10**6), args.local, clock.next())
            sid = Placement(len(clients)).shard_of(r.id)
            await clients[sid].add(shard_pb2.ShardAddRequest(shard_id=sid, records=[r]), 30.0)
        m3, took = await backup(directory, clients)
        print(f"directory, incremental backup after {changed} rewritten records ({args.changed:.0%}): {took:.2f} s, "
              f"{m3.chunks_reused}/{sum(len(s.chunks) for s in m3.shards)} chunks reused, {m3.bytes_written / 1e6:.1f} MB written; "
              f"directory holds {size_of(directory) / 1e6:.0f} MB for 3 backups", flush=True)

        moto = MotoServer()
        try:
            ms3, took = await backup("s3://bench/loupe", clients)
            print(line("S3 (moto_server on loopback), full backup", n, took, ms3.bytes), flush=True)
            for c in clients:
                await c.close()
            for p in procs:
                p.stop()
            v, w, counts = await restore(directory, tmp, args.target_shards)
            assert sum(counts) == n, counts
            print(line(f"directory, restore {args.shards} → {args.target_shards} shards (verify {v:.2f} s + write {w:.2f} s)", n, v + w)
                  + f"; images per target shard {counts}", flush=True)
            v, w, counts = await restore("s3://bench/loupe", tmp, args.target_shards)
            assert sum(counts) == n, counts
            print(line(f"S3 (moto_server), restore {args.shards} → {args.target_shards} shards (verify {v:.2f} s + write {w:.2f} s)", n, v + w),
                  flush=True)
        finally:
            moto.stop()
    print(f"# load average at the end {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
