"""Throughput under concurrency (issue 14, item 5): N searchers of each kind plus M indexers
against a real cluster (``loupe up`` in its own process group, loopback), bounded in time and
requests per phase.

Kinds: ``none`` (global descriptor only) and ``default`` (the default rerank composition of
``loupe search``); each searcher is a closed loop of image queries. Indexers add batches of 4
new images in a closed loop. A refused call (RESOURCE_EXHAUSTED) waits the server's retry
hint before the next, as a well-behaved client does. For each N the script reports, per kind: completed requests/s,
p50/p95/p99 latency, errors by status code; and RSS (max over the phase) of the broker
process, the shards and the extractors.

Images: the ROxford-subset photos when ../shared/data is present (``--collection`` of them
indexed first, queries are the 9 cropped queries), else scikit-image photos and transforms.

    .venv/bin/python bench/load.py [--searchers 1,4,16] [--indexers 4] [--seconds 30]
        [--max-requests 2000] [--replicas 1] [--shards 2] [-- extra loupe up args]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import ROXFORD, actor_pids, machine, rss_mib  # noqa: E402
from cluster.demo import HELD_OUT, INDEXED, PHOTOS, encode_jpeg, load_photo  # noqa: E402
from loupe.client import ImageToAdd, RetrievalClient  # noqa: E402
from loupe.rerank_spec import DEFAULT_SEARCH_RERANK, parse_rerank  # noqa: E402

KINDS = {"none": "none", "default": DEFAULT_SEARCH_RERANK}


def _images(collection: int) -> tuple[list[tuple[str, bytes]], list[tuple[bytes, tuple | None]], str]:
    """(database (id, jpeg), queries (jpeg, crop box), description)."""
    gnd = ROXFORD / "gnd_roxford5k_subset.pkl"
    if gnd.exists():
        from services.eval.ground_truth import load_ground_truth

        gt = load_ground_truth(gnd)
        db = [(n, (ROXFORD / "jpg" / f"{n}.jpg").read_bytes()) for n in gt.imlist[:collection]]
        qs = [((ROXFORD / "jpg" / f"{n}.jpg").read_bytes(), g["bbx"]) for n, g in zip(gt.qimlist, gt.gnd)]
        return db, qs, f"ROxford subset: {len(db)} database images, {len(qs)} cropped queries"
    db = [(f"{p}/{t}", encode_jpeg(fn(load_photo(p)))) for p in PHOTOS for t, fn in INDEXED.items()]
    qs = [(encode_jpeg(HELD_OUT["perspective"](load_photo(p))), None) for p in PHOTOS]
    return db, qs, f"scikit-image photos: {len(db)} database images, {len(qs)} queries"


def _pct(xs: list[float], q: float) -> int | None:
    """``q``-th percentile of ``xs`` seconds, in whole ms (None when nothing completed)."""
    return round(float(np.percentile(np.asarray(xs), q)) * 1000) if xs else None


class Phase:
    """One load phase: closed-loop searchers and indexers until the time or request bound."""

    def __init__(self, client: RetrievalClient, queries, db, seconds: float, max_requests: int) -> None:
        self.client, self.queries, self.db = client, queries, db
        self.stop_at = time.perf_counter() + seconds
        self.max_requests = max_requests
        self.lock = threading.Lock()
        self.latency: dict[str, list[float]] = {k: [] for k in [*KINDS, "index"]}
        self.codes: dict[str, dict[str, int]] = {k: {} for k in [*KINDS, "index"]}
        self.count = 0
        self.added = 0

    def _more(self) -> bool:
        with self.lock:
            if time.perf_counter() >= self.stop_at or self.count >= self.max_requests:
                return False
            self.count += 1
            return True

    @staticmethod
    def _back_off(exc: grpc.RpcError) -> None:
        """Wait as a well-behaved client does after RESOURCE_EXHAUSTED: the server's
        ``grpc-retry-pushback-ms`` hint (100 ms when absent)."""
        if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            return
        hint = dict(exc.trailing_metadata() or ()).get("grpc-retry-pushback-ms")
        time.sleep(int(hint) / 1000 if hint and str(hint).isdigit() else 0.1)

    def _record(self, kind: str, code: str, dt: float, images: int = 0) -> None:
        with self.lock:
            self.codes[kind][code] = self.codes[kind].get(code, 0) + 1
            if code == "OK":
                self.latency[kind].append(dt)
                self.added += images

    def searcher(self, kind: str, i: int) -> None:
        rerank = parse_rerank(KINDS[kind])
        while self._more():
            data, box = self.queries[i % len(self.queries)]
            i += 1
            t0 = time.perf_counter()
            try:
                self.client.search(image=data, crop=box, k=20, rerank=rerank, timeout_s=60)
                self._record(kind, "OK", time.perf_counter() - t0)
            except grpc.RpcError as exc:
                self._record(kind, exc.code().name, time.perf_counter() - t0)
                self._back_off(exc)

    def indexer(self, w: int) -> None:
        n = 0
        while self._more():
            batch = [ImageToAdd(f"load/{w}/{n}/{j}", self.db[(w * 7 + n * 4 + j) % len(self.db)][1]) for j in range(4)]
            n += 1
            t0 = time.perf_counter()
            try:
                self.client.add_images(batch, timeout_s=120)
                self._record("index", "OK", time.perf_counter() - t0, len(batch))
            except grpc.RpcError as exc:
                self._record("index", exc.code().name, time.perf_counter() - t0)
                self._back_off(exc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--searchers", default="1,4,16", help="comma-separated N: searchers of each kind per phase")
    ap.add_argument("--indexers", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=30.0, help="length of a phase")
    ap.add_argument("--max-requests", type=int, default=2000, help="requests per phase, at most")
    ap.add_argument("--collection", type=int, default=200, help="database images indexed before the phases")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("up_args", nargs="*", help="extra `loupe up` arguments (after --)")
    args = ap.parse_args()
    db, queries, what = _images(args.collection)
    loupe = Path(sys.executable).with_name("loupe")
    data = tempfile.mkdtemp(prefix="loupe-load-")
    proc = subprocess.Popen(
        [str(loupe), "up", "--port", "0", "--metrics-port", "0", "--json", "--data-dir", data, "--shards", str(args.shards), "--replicas", str(args.replicas),
         *args.up_args],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    rows = []
    try:
        address = json.loads(proc.stdout.readline())["broker"]
        with RetrievalClient(address, retries=False) as client:
            client.wait_ready(120)
            t0 = time.perf_counter()
            client.add_images([ImageToAdd(i, b) for i, b in db], batch_size=16)
            index_rate = len(db) / (time.perf_counter() - t0)
            client.build_graph()
            for data_q, box in queries[:2]:  # warm-up
                client.search(image=data_q, crop=box, k=20, rerank=parse_rerank(KINDS["default"]), timeout_s=120)
            print(f"machine: {machine()}; {what}; {args.shards} shards, {args.replicas} extractor replica(s); "
                  f"bulk indexing {index_rate:.2f} images/s; load average {os.getloadavg()[0]:.1f}", flush=True)
            for n in (int(x) for x in args.searchers.split(",")):
                phase = Phase(client, queries, db, args.seconds, args.max_requests)
                pids = {"broker": [proc.pid], "shards": actor_pids(proc.pid, "ShardActor"), "extractors": actor_pids(proc.pid, "ExtractorActor")}
                peak = {k: 0.0 for k in pids}
                started = time.perf_counter()
                with ThreadPoolExecutor(2 * n + args.indexers) as pool:
                    futures = [pool.submit(phase.searcher, kind, i) for kind in KINDS for i in range(n)]
                    futures += [pool.submit(phase.indexer, w) for w in range(args.indexers)]
                    while not all(f.done() for f in futures):
                        for k, ps in pids.items():
                            peak[k] = max(peak[k], sum(rss_mib(p) for p in ps))
                        time.sleep(1.0)
                    for f in futures:
                        f.result()
                wall = time.perf_counter() - started
                row = {"searchers_per_kind": n, "indexers": args.indexers, "seconds": round(wall, 1),
                       "load_average": round(os.getloadavg()[0], 1), "rss_peak_mib": {k: round(v) for k, v in peak.items()}}
                for kind in [*KINDS, "index"]:
                    lat = phase.latency[kind]
                    row[kind] = {"per_s": round(len(lat) / wall, 2), "p50_ms": _pct(lat, 50), "p95_ms": _pct(lat, 95),
                                 "p99_ms": _pct(lat, 99), "codes": phase.codes[kind]}
                row["index"]["images_per_s"] = round(phase.added / wall, 2)
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(60)
    print("\n| N per kind | kind | per s | p50 ms | p95 ms | p99 ms | codes | RSS peak MiB broker/shards/extractors |")
    print("|---:|---|---:|---:|---:|---:|---|---|")
    for r in rows:
        for kind in [*KINDS, "index"]:
            k = r[kind]
            rate = f"{k['per_s']}" + (f" ({k['images_per_s']} img/s)" if kind == "index" else "")
            rss = "/".join(str(r["rss_peak_mib"][x]) for x in ("broker", "shards", "extractors"))
            print(f"| {r['searchers_per_kind']} | {kind} | {rate} | {k['p50_ms']} | {k['p95_ms']} | {k['p99_ms']} | {k['codes']} | {rss} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
