"""Images/s of one real extractor gRPC server at 1, 4 and 16 concurrent clients, with and without
dynamic batching (loopback only, bounded in time).

For each ``--batch`` setting a server process is started (``services.extractor.servicer
.create_server`` with the launcher's options: 4 worker threads, 64 admitted calls) on
127.0.0.1, port 0; then for each concurrency N, N client threads send Extract calls (default
descriptor set: global + regions + local features) for ``--seconds`` and the completed
images/s, latency p50/p95 and errors by status code are printed, with the load average.

    .venv/bin/python bench/extract_concurrency.py [--clients 1,4,16] [--batch 1,4] [--seconds 30] [--runtime openvino]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from collections import Counter

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import ROXFORD, machine  # noqa: E402


def _jpegs(n: int) -> list[bytes]:
    jpg = ROXFORD / "jpg"
    if jpg.is_dir():
        return [(jpg / f).read_bytes() for f in sorted(os.listdir(jpg))[:n]]
    import cv2
    from skimage import data

    out = []
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        p = getattr(data, name)()
        p = cv2.resize(p, (1024, round(1024 * p.shape[0] / p.shape[1])))
        out.append(cv2.imencode(".jpg", cv2.cvtColor(p, cv2.COLOR_RGB2BGR))[1].tobytes())
    return (out * n)[:n]


def serve(batch: int, wait_ms: float, runtime: str, threads: int) -> None:
    """Server process: print the port, serve until stdin closes."""
    import torch

    from services.common.grpc_server import ServerOptions
    from services.extractor.global_descriptor import GlobalConfig
    from services.extractor.config import ExtractorConfig
    from services.extractor.servicer import create_server

    torch.set_num_threads(threads if runtime == "torch" else 1)
    cfg = ExtractorConfig(global_config=GlobalConfig(pooling="rmac", max_side=512), runtime=runtime, threads=threads,
                          batch_images=batch, batch_wait_ms=wait_ms)
    running, servicer = create_server(cfg, ServerOptions(host="127.0.0.1", port=0, workers=4, max_concurrent_rpcs=64))
    print(running.port, flush=True)
    sys.stdin.read()
    running.stop(1.0)
    servicer.close()


def load(port: int, clients: int, seconds: float, jpegs: list[bytes]) -> dict:
    import grpc

    from loupe.v1 import extractor_pb2, extractor_pb2_grpc

    lat: list[float] = []
    codes: Counter = Counter()
    stop = time.perf_counter() + seconds
    lock = threading.Lock()

    def client(k: int) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]) as ch:
            stub = extractor_pb2_grpc.ExtractorStub(ch)
            i = k
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                try:
                    stub.Extract(extractor_pb2.ExtractRequest(image=jpegs[i % len(jpegs)], want_regional=True, want_local=True), timeout=300)
                    with lock:
                        lat.append(time.perf_counter() - t0)
                        codes["OK"] += 1
                except grpc.RpcError as exc:
                    with lock:
                        codes[exc.code().name] += 1
                i += clients

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0  # includes the calls in flight at the deadline
    return {"images_s": codes["OK"] / elapsed, "p50": float(np.median(lat)) if lat else float("nan"),
            "p95": float(np.percentile(lat, 95)) if lat else float("nan"), "codes": dict(codes)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--batch", default="1,4", help="comma-separated batch_images settings to compare")
    ap.add_argument("--wait-ms", type=float, default=2.0)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--runtime", default="openvino")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--serve", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.wait_ms, args.runtime, args.threads)
        return
    jpegs = _jpegs(16)
    print(f"machine: {machine()}; runtime {args.runtime}, {args.threads} threads; {len(jpegs)} images "
          f"({'ROxford' if (ROXFORD / 'jpg').is_dir() else 'scikit-image'}); {args.seconds:.0f} s per point")
    print(f"{'batch':>5s} {'clients':>7s} {'images/s':>8s} {'p50 s':>7s} {'p95 s':>7s} {'load':>5s}  codes")
    for batch in (int(b) for b in args.batch.split(",")):
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", str(batch), "--wait-ms", str(args.wait_ms),
                                 "--runtime", args.runtime, "--threads", str(args.threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            port = int(proc.stdout.readline())
            load(port, 1, min(5.0, args.seconds), jpegs)  # warm-up
            for n in (int(c) for c in args.clients.split(",")):
                r = load(port, n, args.seconds, jpegs)
                print(f"{batch:5d} {n:7d} {r['images_s']:8.2f} {r['p50']:7.2f} {r['p95']:7.2f} {os.getloadavg()[0]:5.1f}  {r['codes']}", flush=True)
        finally:
            proc.stdin.close()
            proc.wait(timeout=60)


if __name__ == "__main__":
    main()
