"""Per-request cost of TLS and token auth against plaintext, on loopback, in one process.

Four servers built by loupe's own helper (services/common/grpc_server.py) serve the same
trivial ``loupe.v1.Retrieval/GetStats`` handler (a fixed response: no fan-out, so only
transport + interceptor cost is measured): plaintext, auth only, TLS only, TLS + auth. Both
server kinds are measured: asyncio (the public broker) and sync thread-pool (shards,
extractors). The client is loupe's ``RetrievalClient`` (token interceptor, CA file), one warm
channel per server. Rounds are interleaved across configurations; the per-call median and p90
over all rounds are reported, plus the first-call cost of a new channel (TCP + TLS handshake).

    .venv/bin/python bench/auth_tls_cost.py [--calls 400] [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))  # throwaway PKI helper

from bench._common import machine  # noqa: E402
from loupe.client import RetrievalClient  # noqa: E402
from loupe.v1 import retrieval_pb2  # noqa: E402
from secure_setup import make_pki, make_tokens  # noqa: E402
from services.common.auth import AuthPolicy, read_tokens_file  # noqa: E402
from services.common.grpc_server import ServerOptions, create_aio_server, create_sync_server  # noqa: E402

RESPONSE = retrieval_pb2.GetStatsResponse(images=1000, dim=512, model="bench")


def _handler(aio: bool) -> grpc.GenericRpcHandler:
    if aio:
        async def stats(_req, _ctx):
            return RESPONSE
    else:
        def stats(_req, _ctx):  # type: ignore[misc]
            return RESPONSE
    method = grpc.unary_unary_rpc_method_handler(
        stats, request_deserializer=retrieval_pb2.GetStatsRequest.FromString, response_serializer=retrieval_pb2.GetStatsResponse.SerializeToString
    )
    return grpc.method_handlers_generic_handler("loupe.v1.Retrieval", {"GetStats": method})


def _start(kind: str, opts: ServerOptions, loop: asyncio.AbstractEventLoop):
    if kind == "aio":
        fut = asyncio.run_coroutine_threadsafe(create_aio_server(lambda s: s.add_generic_rpc_handlers((_handler(True),)), ["loupe.v1.Retrieval"], opts), loop)
        running = fut.result(30)
        return running.port, lambda: asyncio.run_coroutine_threadsafe(running.stop(0), loop).result(10)
    running = create_sync_server(lambda s: s.add_generic_rpc_handlers((_handler(False),)), ["loupe.v1.Retrieval"], opts)
    return running.port, lambda: running.stop(0)


def _time_calls(client: RetrievalClient, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        client.stats(timeout_s=10)
        out.append(time.perf_counter() - t0)
    return out


def _first_call(address: str, kwargs: dict, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        with RetrievalClient(address, **kwargs) as c:
            c.stats(timeout_s=10)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=400, help="calls per configuration per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--handshakes", type=int, default=30, help="new channels timed per configuration")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="loupe-bench-tls-"))
    pki, tokens = make_pki(tmp / "tls"), make_tokens(tmp / "auth")
    policy = AuthPolicy.from_tokens(read_tokens_file(str(tokens.tokens_file)))
    configs = {
        "plaintext": ({}, {}),
        "auth": ({"auth": policy}, {"token": tokens.read}),
        "tls": ({"tls_cert_file": str(pki.cert), "tls_key_file": str(pki.key)}, {"tls_ca_file": str(pki.ca)}),
        "tls+auth": ({"tls_cert_file": str(pki.cert), "tls_key_file": str(pki.key), "auth": policy}, {"tls_ca_file": str(pki.ca), "token": tokens.read}),
    }
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    load_before = os.getloadavg()
    results: dict[str, dict] = {}
    for kind in ("aio", "sync"):
        servers, clients, stops = {}, {}, []
        for name, (server_kw, client_kw) in configs.items():
            port, stop = _start(kind, ServerOptions(host="127.0.0.1", port=0, **server_kw), loop)
            stops.append(stop)
            servers[name] = (f"127.0.0.1:{port}", client_kw)
            clients[name] = RetrievalClient(f"127.0.0.1:{port}", **client_kw)
            _time_calls(clients[name], 50)  # warm-up
        samples: dict[str, list[float]] = {name: [] for name in configs}
        for _ in range(args.rounds):
            for name in configs:
                samples[name] += _time_calls(clients[name], args.calls)
        for name, (address, client_kw) in servers.items():
            first = _first_call(address, client_kw, args.handshakes)
            lat = np.array(samples[name]) * 1e6
            results[f"{kind}/{name}"] = {
                "median_us": round(float(np.median(lat)), 1), "p90_us": round(float(np.percentile(lat, 90)), 1),
                "calls": len(lat), "new_channel_first_call_median_ms": round(float(np.median(first)) * 1e3, 2),
            }
        for c in clients.values():
            c.close()
        for stop in stops:
            stop()
    loop.call_soon_threadsafe(loop.stop)
    out = {"machine": machine(), "grpc": grpc.__version__, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
           "calls_per_config": args.calls * args.rounds, "results": results}
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(f"{out['machine']}, grpcio {grpc.__version__}; load average before {load_before[0]:.2f}, after {out['loadavg_after'][0]:.2f}")
    print(f"{'server/config':<20} {'median µs':>10} {'p90 µs':>8} {'+median vs plain':>17} {'new channel ms':>15}")
    for key, r in results.items():
        base = results[key.split("/")[0] + "/plaintext"]["median_us"]
        print(f"{key:<20} {r['median_us']:>10.1f} {r['p90_us']:>8.1f} {r['median_us'] - base:>+17.1f} {r['new_channel_first_call_median_ms']:>15.2f}")


if __name__ == "__main__":
    main()
