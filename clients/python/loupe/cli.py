"""``loupe-client``: search and stats against a running broker, with the thin client only.

The server's ``loupe`` command does the same over ``--address`` (and starts clusters, indexes
directories, evaluates); this one needs only grpcio, protobuf and numpy. Output is JSON, with the
keys of ``loupe search --json`` / ``loupe stats --json``. Token: ``--token-file``, env
``LOUPE_TOKEN`` or ``LOUPE_TOKEN_FILE`` (never in argv); TLS: ``--tls-ca-file`` or env
``LOUPE_TLS_CA_FILE``; address: ``--address`` or env ``LOUPE_ADDRESS``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

import grpc

from loupe.client import RetrievalClient, parse_filter, token_from_env
from loupe.rerank_spec import DEFAULT_SEARCH_RERANK, PARAMS, STAGES, parse_rerank
from loupe.v1 import retrieval_pb2


def build_parser() -> argparse.ArgumentParser:
    """Parser of ``loupe-client {search,stats}``."""
    parser = argparse.ArgumentParser(prog="loupe-client", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    se = sub.add_parser("search", help="search with an image file, or with an indexed image's id (--id)")
    se.add_argument("image", nargs="?", help="query image file (or give --id)")
    se.add_argument("--id", default=None, help="search with the stored features of this indexed image")
    se.add_argument("--include-query", action="store_true", help="with --id: keep the query image in the results")
    se.add_argument("--filter", action="append", default=[], metavar="SPEC",
                    help="metadata filter, repeatable (AND): key=value, key=a|b, key>=x, key>x, key<=x, key<x")
    se.add_argument("--k", type=int, default=10)
    se.add_argument("--offset", type=int, default=0)
    se.add_argument("--rerank", default=DEFAULT_SEARCH_RERANK,
                    help=f"rerank stages, comma-joined (default {DEFAULT_SEARCH_RERANK}, as `loupe search`): {', '.join(STAGES)}; "
                    f"parameters as key=value items: {', '.join(PARAMS)}")
    _add_connection(se)
    st = sub.add_parser("stats", help="collection and cluster statistics")
    _add_connection(st)
    return parser


def _add_connection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=os.environ.get("LOUPE_ADDRESS"), help="broker host:port (env LOUPE_ADDRESS)")
    p.add_argument("--token-file", default=None, metavar="FILE", help="file holding the bearer token (default: env LOUPE_TOKEN, then LOUPE_TOKEN_FILE)")
    p.add_argument("--tls-ca-file", default=os.environ.get("LOUPE_TLS_CA_FILE"), metavar="PEM",
                   help="CA that signed the broker's certificate → TLS (env LOUPE_TLS_CA_FILE)")
    p.add_argument("--deadline", type=float, default=30.0, metavar="SECONDS", help="deadline of the call (default 30)")


def search_json(resp: retrieval_pb2.SearchResponse, offset: int = 0) -> dict[str, Any]:
    """JSON-able view of a SearchResponse (the keys of ``loupe search --json``)."""
    results = [
        {"rank": offset + i + 1, "id": r.id, "score": round(r.score, 6), "global": round(getattr(r.stages, "global"), 6),
         "inliers": r.stages.inliers, "verified": r.verified, "confidence": round(r.confidence, 4), "shard": r.shard_id}
        for i, r in enumerate(resp.results)
    ]
    return {"results": results, "partial": resp.partial, "missing_shards": list(resp.missing_shards),
            "timings_ms": {t.stage: round(t.seconds * 1000, 2) for t in resp.timings}, "query_confidence": resp.query_confidence}


def stats_json(s: retrieval_pb2.GetStatsResponse) -> dict[str, Any]:
    """JSON-able view of a GetStatsResponse (the keys of ``loupe stats --json``)."""
    shards = [
        {"shard": x.shard_id, "address": x.address, "healthy": x.healthy, "images": x.images, "feature_bytes": x.feature_bytes,
         "store_bytes": x.store_bytes, "index_bytes": x.index_bytes, "index": x.index, "startup_seconds": round(x.startup_seconds, 3),
         "oversized_records": x.oversized_records,
         "replicas": [{"replica": r.replica, "address": r.address, "state": r.state, "images": r.images, "lag_writes": r.lag_writes,
                       "catch_up_progress": round(r.catch_up_progress, 3), "digest": f"{r.digest:016x}", "store_id": r.store_id}
                      for r in x.replicas]}
        for x in s.shards
    ]
    return {"images": s.images, "dim": s.dim, "whitened": s.whitened, "model": s.model, "extractors": list(s.extractors), "shards": shards,
            "graph_images": s.graph_images, "graph_regions": s.graph_regions}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Execute one parsed command and return its JSON document."""
    if not args.address:
        raise ValueError("--address: give the broker's host:port (or set LOUPE_ADDRESS)")
    token = token_from_env(args.token_file)
    with RetrievalClient(args.address, token=token, tls_ca_file=args.tls_ca_file or None) as client:
        if args.command == "stats":
            return stats_json(client.stats(timeout_s=args.deadline))
        if (args.image is None) == (args.id is None):
            raise ValueError("search: give a query image file or --id (one of them)")
        data = None
        if args.image is not None:
            with open(args.image, "rb") as f:
                data = f.read()
        resp = client.search(image=data, image_id=args.id, include_query=args.include_query, k=args.k, offset=args.offset,
                             rerank=parse_rerank(args.rerank), filter=parse_filter(args.filter) if args.filter else None,
                             timeout_s=args.deadline)
        return search_json(resp, args.offset)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; exit 2 with ``CODE: details`` on a gRPC error or bad input."""
    args = build_parser().parse_args(argv)
    try:
        print(json.dumps(run(args)))
        return 0
    except grpc.RpcError as exc:
        print(f"loupe-client {args.command}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        print(f"loupe-client {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
