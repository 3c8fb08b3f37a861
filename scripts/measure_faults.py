"""Measure loupe's fault-tolerance numbers against a real ``loupe up`` (docs/faults.md).

Starts ``loupe up`` (2 shards, 1 extractor replica, default broker settings) in its own process
group, indexes a few sample photos, then:

1. sustainable load: closed loop of image searches at the extraction concurrency, for
   ``--seconds``; throughput X per second;
2. overload: an open loop at 4 X for ``--seconds``: share of RESOURCE_EXHAUSTED answers, how
   fast they come back, p99 of the admitted requests;
3. a hung shard: SIGSTOP one shard process; vector and image searches with 2 s / 10 s
   deadlines: p99 and the share of partial answers; SIGCONT.

Usage: .venv/bin/python scripts/measure_faults.py [--seconds 20]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import actor_pids  # noqa: E402
from cluster.demo import encode_jpeg, load_photo  # noqa: E402
from loupe.client import ImageToAdd, RetrievalClient  # noqa: E402

PHOTOS = ("coffee", "chelsea", "rocket", "camera", "astronaut", "coins", "moon", "clock")


def _jpeg(name: str, side: int = 320) -> bytes:
    img = load_photo(name)
    step = max(1, max(img.shape[:2]) // side)
    return encode_jpeg(np.ascontiguousarray(img[::step, ::step]))


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def _shard_pids(root: int) -> list[int]:
    return actor_pids(root, "ShardActor")


def _search(client: RetrievalClient, image: bytes, timeout: float) -> tuple[str, float]:
    t0 = time.perf_counter()
    try:
        client.search(image=image, k=5, timeout_s=timeout)
        return "OK", time.perf_counter() - t0
    except grpc.RpcError as exc:
        return exc.code().name, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("up_args", nargs="*", help="extra `loupe up` arguments (after --)")
    args = ap.parse_args()
    loupe = Path(sys.executable).with_name("loupe")
    data = tempfile.mkdtemp(prefix="loupe-faults-")
    proc = subprocess.Popen([str(loupe), "up", "--port", "0", "--metrics-port", "0", "--json", "--data-dir", data, *args.up_args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        info = json.loads(proc.stdout.readline())
        address = info["broker"]
        queries = [_jpeg(p, 300) for p in PHOTOS]
        with RetrievalClient(address, retries=False) as client:
            client.wait_ready(60)
            client.add_images([ImageToAdd(f"{p}/{i}", _jpeg(p, 320 - 24 * i)) for p in PHOTOS for i in range(3)])
            for q in queries[:2]:
                client.search(image=q, k=5, timeout_s=60)

            # 1. sustainable: closed loop at 2 concurrent (the extraction slots of one replica)
            done: list[float] = []
            stop = time.perf_counter() + args.seconds

            def loop(i: int) -> None:
                while time.perf_counter() < stop:
                    code, dt = _search(client, queries[i % len(queries)], 60)
                    if code == "OK":
                        done.append(dt)

            with ThreadPoolExecutor(2) as pool:
                list(pool.map(loop, range(2)))
            rate = len(done) / args.seconds
            print(f"sustainable: {rate:.2f} image searches/s (closed loop, 2 concurrent), p99 {_pct(done, 99):.2f} s", flush=True)

            # 2. overload: open loop at 4x
            results: list[tuple[str, float]] = []
            lock = threading.Lock()
            interval = 1.0 / (4 * rate)
            with ThreadPoolExecutor(256) as pool:
                t_next, end, n = time.perf_counter(), time.perf_counter() + args.seconds, 0

                def fire(i: int) -> None:
                    r = _search(client, queries[i % len(queries)], 20)
                    with lock:
                        results.append(r)

                while t_next < end:
                    pool.submit(fire, n)
                    n += 1
                    t_next += interval
                    time.sleep(max(0.0, t_next - time.perf_counter()))
            refused = [dt for c, dt in results if c == "RESOURCE_EXHAUSTED"]
            ok = [dt for c, dt in results if c == "OK"]
            other = {c: sum(1 for x, _ in results if x == c) for c in {c for c, _ in results} - {"OK", "RESOURCE_EXHAUSTED"}}
            print(f"overload at 4x ({4 * rate:.1f}/s, {len(results)} requests): {len(refused) / len(results):.0%} RESOURCE_EXHAUSTED "
                  f"(p50 {_pct(refused, 50) * 1000:.1f} ms, p99 {_pct(refused, 99) * 1000:.1f} ms), {len(ok)} admitted "
                  f"(p50 {_pct(ok, 50):.2f} s, p99 {_pct(ok, 99):.2f} s), other {other}", flush=True)

            # 3. a hung shard
            time.sleep(2.0)
            pids = _shard_pids(proc.pid)
            assert len(pids) == 2, f"expected 2 shard processes, found {pids}"
            client.search(image=queries[0], k=1, timeout_s=60)  # settled after the burst
            os.kill(pids[-1], signal.SIGSTOP)
            try:
                lat, partial, codes = [], 0, {}
                for i in range(40):
                    t0 = time.perf_counter()
                    try:
                        resp = client.search(image=queries[i % len(queries)], k=5, timeout_s=10)
                        partial += resp.partial
                        codes["OK"] = codes.get("OK", 0) + 1
                    except grpc.RpcError as exc:
                        codes[exc.code().name] = codes.get(exc.code().name, 0) + 1
                    lat.append(time.perf_counter() - t0)
            finally:
                os.kill(pids[-1], signal.SIGCONT)
            print(f"one of 2 shards stopped: 40 image searches (10 s deadline) p50 {_pct(lat, 50):.2f} s p99 {_pct(lat, 99):.2f} s, "
                  f"partial {partial}/40, codes {codes}", flush=True)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        rc = proc.wait(timeout=120)
        print(f"loupe up exited {rc} after SIGTERM to its process group")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
