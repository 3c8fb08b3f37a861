"""Choose the shard's embedded store by measurement: LMDB vs SQLite (WAL) vs RocksDB.

Every engine stores the same full loupe records (global 1280-D float32, 5 regional float16
centroids, 1000 int8 local descriptors of 40-D + float16 keypoints: ~66 KB) and is driven the
way a shard drives it: a write is acknowledged only after the engine made it durable (fsync),
one record per commit ("ack each") and 16 records per commit (group commit, as one AddImages
batch arrives). Measured: acknowledged records/s both ways, random read latency of one image's
local features, file bytes after deleting everything, and the time to reopen the store.

    .venv/bin/python bench/storage_engines.py --records 2000 --runs 3

Results go to BENCHMARKS.md ("Storage engine").
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import tempfile
import time

import numpy as np

from _common import machine

D, REGIONS, LOCALS, LOCAL_DIM = 1280, 5, 1000, 40


def make_record(rng: np.random.Generator) -> dict[str, bytes]:
    """The three blobs of one image, as the shard stores them."""
    return {
        "g": rng.standard_normal(D).astype(np.float32).tobytes(),
        "r": rng.standard_normal((REGIONS, D)).astype(np.float16).tobytes(),
        "l": rng.integers(-127, 127, (LOCALS, LOCAL_DIM), dtype=np.int8).tobytes()
        + rng.standard_normal((LOCALS, 4)).astype(np.float16).tobytes(),
    }


def du(path: str) -> int:
    """Bytes allocated on disk below ``path``."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.stat(os.path.join(root, f)).st_blocks * 512
    return total


class Lmdb:
    name = "lmdb"

    def __init__(self, path: str) -> None:
        import lmdb

        self.env = lmdb.open(path, map_size=1 << 36, max_dbs=4, sync=True, metasync=True, writemap=False)
        self.dbs = {k: self.env.open_db(k.encode()) for k in "grl"}

    def put(self, batch: list[tuple[str, dict[str, bytes]]]) -> None:
        with self.env.begin(write=True) as txn:
            for key, rec in batch:
                for k, v in rec.items():
                    txn.put(key.encode(), v, db=self.dbs[k])

    def delete(self, keys: list[str]) -> None:
        with self.env.begin(write=True) as txn:
            for key in keys:
                for db in self.dbs.values():
                    txn.delete(key.encode(), db=db)

    def get_local(self, key: str) -> bytes:
        with self.env.begin(buffers=False) as txn:
            return txn.get(key.encode(), db=self.dbs["l"])

    def close(self) -> None:
        self.env.close()


class Sqlite:
    name = "sqlite-wal"

    def __init__(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        self.db = sqlite3.connect(os.path.join(path, "store.db"), isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS rec (id TEXT PRIMARY KEY, g BLOB, r BLOB, l BLOB)")

    def put(self, batch: list[tuple[str, dict[str, bytes]]]) -> None:
        self.db.execute("BEGIN")
        self.db.executemany("INSERT OR REPLACE INTO rec VALUES (?, ?, ?, ?)", [(k, r["g"], r["r"], r["l"]) for k, r in batch])
        self.db.execute("COMMIT")

    def delete(self, keys: list[str]) -> None:
        self.db.execute("BEGIN")
        self.db.executemany("DELETE FROM rec WHERE id = ?", [(k,) for k in keys])
        self.db.execute("COMMIT")

    def get_local(self, key: str) -> bytes:
        return self.db.execute("SELECT l FROM rec WHERE id = ?", (key,)).fetchone()[0]

    def close(self) -> None:
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.db.close()


class Rocks:
    name = "rocksdb"

    def __init__(self, path: str) -> None:
        from rocksdict import Options, Rdict, WriteOptions

        opts = Options(raw_mode=True)
        opts.create_if_missing(True)
        self.db = Rdict(path, opts)
        wo = WriteOptions()
        wo.sync = True
        self.db.set_write_options(wo)

    def put(self, batch: list[tuple[str, dict[str, bytes]]]) -> None:
        from rocksdict import WriteBatch

        wb = WriteBatch(raw_mode=True)
        for key, rec in batch:
            for k, v in rec.items():
                wb.put(f"{k}/{key}".encode(), v)
        self.db.write(wb)

    def delete(self, keys: list[str]) -> None:
        from rocksdict import WriteBatch

        wb = WriteBatch(raw_mode=True)
        for key in keys:
            for k in "grl":
                wb.delete(f"{k}/{key}".encode())
        self.db.write(wb)
        self.db.compact_range(None, None)

    def get_local(self, key: str) -> bytes:
        return self.db.get(f"l/{key}".encode())

    def close(self) -> None:
        self.db.close()


def run_engine(cls, n: int, rng: np.random.Generator) -> dict[str, float]:
    root = tempfile.mkdtemp(prefix=f"loupe-bench-{cls.name}-", dir=os.environ.get("BENCH_DIR"))
    path = os.path.join(root, "db")
    try:
        store = cls(path)
        recs = [(f"img-{i:07d}", make_record(rng)) for i in range(n)]
        each = min(n, 200)
        t0 = time.perf_counter()
        for item in recs[:each]:
            store.put([item])
        ack_each = each / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i in range(each, n, 16):
            store.put(recs[i : i + 16])
        group = (n - each) / (time.perf_counter() - t0)
        keys = [k for k, _ in recs]
        picks = rng.choice(n, size=500)
        lat = []
        for i in picks:
            t = time.perf_counter()
            store.get_local(keys[i])
            lat.append(time.perf_counter() - t)
        full = du(path)
        store.close()
        t0 = time.perf_counter()
        store = cls(path)
        store.get_local(keys[0])
        reopen = time.perf_counter() - t0
        for i in range(0, n, 64):
            store.delete(keys[i : i + 64])
        store.close()
        after_delete = du(path)
        return {
            "ack_each_per_s": ack_each,
            "group16_per_s": group,
            "read_local_p50_us": 1e6 * float(np.median(lat)),
            "read_local_p99_us": 1e6 * float(np.percentile(lat, 99)),
            "disk_mb_full": full / 1e6,
            "disk_mb_after_delete_all": after_delete / 1e6,
            "reopen_ms": 1e3 * reopen,
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    print(f"machine: {machine()}; load average {os.getloadavg()}; {args.records} records of ~66 KB; median of {args.runs} runs")
    for cls in (Lmdb, Sqlite, Rocks):
        runs = [run_engine(cls, args.records, np.random.default_rng(seed)) for seed in range(args.runs)]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"{cls.name:<11} " + "  ".join(f"{k} {v:,.1f}" for k, v in med.items()), flush=True)


if __name__ == "__main__":
    main()
