"""The ``loupe`` command line: up, index, search, stats, eval, backup, restore, reshard, demo."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
from typing import Any, Iterator, Sequence

import grpc

from loupe.rerank_spec import DEFAULT_SEARCH_RERANK, PARAMS, STAGES, parse_rerank
from loupe.cli import search_json, stats_json
from loupe.client import parse_filter

from cluster.whitening import DEFAULT_CANDIDATES, DEFAULT_PAIR_QUERIES, METHODS, after_index, whiten

DESCRIPTION = """loupe: instance-level image retrieval on a sharded gRPC cluster (Ray).

Commands talk gRPC to a running broker given by --address; index, search, stats and eval
without --address start a temporary local cluster for the command and tear it down."""


def _add_cluster_flags(p: argparse.ArgumentParser, *, temporary: bool) -> None:
    g = p.add_argument_group("cluster" + (" (when no --address is given)" if temporary else ""))
    g.add_argument("--shards", type=int, default=None, help="index shards (default 2)")
    g.add_argument("--replication-factor", type=int, default=None,
                   help="copies of every shard, each with its own store directory/volume (default 1; the chart's production example: 2)")
    g.add_argument("--replicas", type=int, default=None, help="extractor replicas (default 1)")
    g.add_argument("--extractor-threads", type=int, default=None, help="backbone threads per replica (default: the CPU limit of its pod/machine shared by the replicas there)")
    g.add_argument("--shard-threads", type=int, default=None, help="faiss search threads per shard (default: the CPU limit of its pod/machine shared by the shards there)")
    g.add_argument("--extractor-runtime", default=None, choices=["torch", "onnxruntime", "openvino"],
                   help="what runs the backbone in each replica (default openvino; env LOUPE_EXTRACTOR_RUNTIME)")
    g.add_argument("--extractor-query-runtime", default=None, choices=["", "torch", "onnxruntime", "openvino"],
                   help="what runs search queries' backbone passes (default onnxruntime: no recompiles for new sizes; '' = as --extractor-runtime)")
    g.add_argument("--extractor-batch-images", type=int, default=None,
                   help="most same-size images a replica describes in one batch (default 4; 1 = no batching)")
    g.add_argument("--extractor-batch-wait-ms", type=float, default=None,
                   help="longest a replica's batch waits for more images after its first, ms (default 2)")
    g.add_argument("--data-dir", default=None, help="where shards keep their stores and the broker its collection model" + ("" if temporary else " (default ./loupe-data)"))
    g.add_argument("--index-factory", default=None,
                   help="each shard's index: auto (default: exact, then IVF-PQ from --approx-min-images), Flat (always exact) or a faiss factory string")
    g.add_argument("--approx-min-images", type=int, default=None, help="images in a shard from which its approximate index is trained (default 100000; 0 = never)")
    g.add_argument("--weights", default=None, help="backbone weights file (default: packaged ImageNet EfficientNet-Lite0)")
    g.add_argument("--attention", default=None, help="trained attention-head file for local features (default: L2-norm scoring)")
    g.add_argument("--pooling", default=None, choices=["gem", "rmac", "mac", "spoc"], help="global pooling (default rmac)")
    g.add_argument("--scales", default=None, help="comma-separated image scales (default 1,0.7071,0.5)")
    g.add_argument("--max-side", type=int, default=None, help="longest side of the working image, local features (default 1024)")
    g.add_argument("--global-max-side", type=int, default=None, help="longest side for the global descriptor (default 512)")
    g.add_argument("--regional-from", choices=["working", "global"], default=None,
                   help="pool regional vectors from the working image (default) or the global descriptor's largest scale")
    g.add_argument("--regions-per-image", type=int, default=None, help="k-means centroids kept of each image's regions (default 5; 0 = all)")
    g.add_argument("--query-local-max-side", type=int, default=None,
                   help="working-image side of a search query's local features (default: --max-side, as indexed)")
    g.add_argument("--local-layer", default=None, help="backbone tap of the local features (must match the indexed collection)")
    g.add_argument("--local-scales", default=None, help="comma-separated pyramid scales of the local features")
    g.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting a local one")
    g.add_argument("--shard-resource", default=None, metavar="NAME",
                   help="custom Ray resource each shard actor asks 1 unit of (places shards on the nodes that advertise it; default none); "
                        "{shard} and {replica} in it name one resource per shard replica, e.g. loupe_shard_{shard}_r{replica}")
    g.add_argument("--extractor-resource", default=None, metavar="NAME",
                   help="custom Ray resource each extractor replica asks 1 unit of (default none)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loupe", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start a cluster and serve until Ctrl-C/SIGTERM")
    lim = up.add_argument_group("broker limits (defaults measured on 2 cores: docs/faults.md)")
    lim.add_argument("--max-inflight", type=int, default=None, help="requests the broker works on at once; more → RESOURCE_EXHAUSTED (default 128)")
    lim.add_argument("--max-extract-queue", type=int, default=None,
                     help="search images, and indexing images, that may wait for extraction (each; searches go first); more → RESOURCE_EXHAUSTED (default 8)")
    lim.add_argument("--rerank-slots", type=int, default=None,
                     help="searches with rerank stages (verify, diffuse, expand) worked on at once, from admission to answer (default 4)")
    lim.add_argument("--max-rerank-queue", type=int, default=None,
                     help="such searches that may wait for a rerank slot; more → RESOURCE_EXHAUSTED before any extraction (default 8)")
    lim.add_argument("--shard-budget-s", type=float, default=None, help="longest a shard may take per call before the answer goes partial (default 2.0)")
    lim.add_argument("--shard-budget-fraction", type=float, default=None,
                     help="a shard call gets at most this fraction of the caller's remaining deadline (default 0.5)")
    lim.add_argument("--default-timeout-s", type=float, default=None, help="deadline of a call that sets none (default 30)")
    lim.add_argument("--extract-hedge-s", type=float, default=None,
                     help="an extraction with no answer after this long also goes to a second replica (0 = only on failure; default 2.0)")
    lim.add_argument("--write-quorum", default=None,
                     help="replicas of a shard that must store a write before it is acknowledged: all, majority (2 of 2, 2 of 3) "
                          "or a number (default majority)")
    lim.add_argument("--replica-hedge-s", type=float, default=None,
                     help="a shard read unanswered by one replica after this long also goes to another in-sync replica "
                          "(0 = only on failure; default 0.1)")
    lim.add_argument("--shard-down-grace-s", type=float, default=None,
                     help="a shard silent this long turns the broker's 'loupe.shards' health NOT_SERVING (default 60)")
    lim.add_argument("--shutdown-grace-s", type=float, default=None, help="in-flight calls drain this long after SIGTERM (default 5)")
    up.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 in a real cluster)")
    up.add_argument("--port", type=int, default=50051, help="broker gRPC port (0 = any)")
    up.add_argument("--metrics-port", type=int, default=9090, help="Prometheus /metrics port (0 = any)")
    up.add_argument("--metrics-host", default=None, help="interface of every /metrics exporter: broker, shards, extractors (default: same as --host)")
    up.add_argument("--shard-metrics-port", type=int, default=None,
                    help="/metrics port of each shard actor (default 0 = any free port; Kubernetes: a fixed one, e.g. 9091)")
    up.add_argument("--extractor-metrics-port", type=int, default=None,
                    help="/metrics port of each extractor replica (default 0 = any free port; Kubernetes: a fixed one, e.g. 9092)")
    sec = up.add_argument_group("security (docs/security.md); each also from LOUPE_<FLAG> env, e.g. LOUPE_AUTH_TOKENS_FILE")
    sec.add_argument("--tls-cert-file", default=None, metavar="PEM", help="certificate chain of the public broker port (TLS; with --tls-key-file)")
    sec.add_argument("--tls-key-file", default=None, metavar="PEM", help="private key of the public broker port")
    sec.add_argument("--auth-tokens-file", default=None, metavar="FILE",
                     help="bearer tokens, one 'ROLE TOKEN' per line (read|write); required when --host is not loopback")
    sec.add_argument("--internal-token-file", default=None, metavar="FILE",
                     help="cluster-internal token shards/extractors require from the broker (default: generated when auth is on)")
    sec.add_argument("--internal-tls-cert-file", default=None, metavar="PEM",
                     help="mutual TLS broker <-> shards/extractors: certificate (SAN DNS loupe-internal, server+client auth)")
    sec.add_argument("--internal-tls-key-file", default=None, metavar="PEM", help="its private key")
    sec.add_argument("--internal-tls-ca-file", default=None, metavar="PEM", help="CA that signed it (both sides verify against it)")
    sec.add_argument("--insecure-no-auth", action="store_true", default=None,
                     help="serve beyond loopback without --auth-tokens-file (anyone who reaches the port can read and delete)")
    up.add_argument("--address", dest="ray_address_alias", default=None, help="join an existing Ray cluster (same as --ray-address)")
    up.add_argument("--json", action="store_true", help="print addresses as JSON")
    _add_cluster_flags(up, temporary=False)

    ix = sub.add_parser("index", help="index every image under a directory")
    ix.add_argument("directory")
    ix.add_argument("--batch", type=int, default=16, help="images per AddImages message")
    _add_whiten_flag(ix, "the collection whitening learned after indexing")
    ix.add_argument("--no-graph", action="store_true", help="do not (re)build the collection's kNN graphs (global and regional) for diffusion afterwards")
    _add_common(ix)

    gr = sub.add_parser("build-graph", help="(re)build the collection's kNN graphs (global and regional) used by diffusion")
    gr.add_argument("--k", type=int, default=0, help="neighbours per image (default: the broker's diffusion k, 50)")
    gr.add_argument("--remove", action="store_true", help="remove the graphs (diffusion builds one per query again)")
    _add_common(gr)

    wh = sub.add_parser("whiten", help="learn and install the collection whitening (PCA, or learned from verified pairs), then rebuild the graphs")
    wh.add_argument("method", nargs="?", choices=METHODS, default="verified",
                    help="verified (default): the learned whitening from pairs of indexed images that geometric verification "
                         "finds; pca: the PCA-whitening of a sample")
    wh.add_argument("--dim", type=int, default=None,
                    help="output dimension (default: 512 for verified, every component the sample supports for pca)")
    wh.add_argument("--candidates", type=int, default=DEFAULT_CANDIDATES, help="verified: global neighbours verified per searching image")
    wh.add_argument("--min-inliers", type=int, default=0, help="verified: inliers a pair needs (default: the server's threshold)")
    wh.add_argument("--pair-queries", type=int, default=DEFAULT_PAIR_QUERIES,
                    help="verified: images that search for their verified neighbours (a random sample of larger collections; 0 = all)")
    wh.add_argument("--remove", action="store_true", help="remove the whitening (back to raw descriptors)")
    wh.add_argument("--no-graph", action="store_true", help="do not rebuild the collection's kNN graphs afterwards")
    _add_common(wh)

    se = sub.add_parser("search", help="search with an image, or with an indexed image's id (--id)")
    se.add_argument("image", nargs="?", help="query image file (or give --id)")
    se.add_argument("--id", default=None, help="search with the stored features of this indexed image ('more like this')")
    se.add_argument("--include-query", action="store_true", help="with --id: keep the query image in the results")
    se.add_argument("--filter", action="append", default=[], metavar="SPEC",
                    help="metadata filter, repeatable (AND): key=value, key=a|b, key>=x, key>x, key<=x, key<x (numbers or ISO dates)")
    se.add_argument("--k", type=int, default=10)
    se.add_argument("--offset", type=int, default=0)
    se.add_argument("--crop", default=None, help="x1,y1,x2,y2 box of the query in pixels")
    se.add_argument(
        "--rerank", default=DEFAULT_SEARCH_RERANK,
        help=f"rerank stages, comma-joined (default {DEFAULT_SEARCH_RERANK}: the global top-1000 rescored by global + best "
        f"regional similarity, then geometric verification of its top-40 — chosen on held-out cropped queries of a collection "
        f"whitened from its verified pairs, BENCHMARKS.md): {', '.join(STAGES)}; "
        f"parameters as key=value items: {', '.join(PARAMS)} (e.g. diffuse-regional,k=30,alpha=0.95)",
    )
    se.add_argument("--show", default=None, metavar="OUT.png", help="draw the query beside the top results with inlier lines (implies --rerank verify)")
    se.add_argument("--show-top", type=int, default=4, help="results drawn by --show")
    _add_common(se)

    gt = sub.add_parser("get", help="stored records of image ids (metadata, size, shard)")
    gt.add_argument("ids", nargs="+")
    gt.add_argument("--vector", action="store_true", help="also print each stored global descriptor's dimension and first values")
    _add_common(gt)

    ls = sub.add_parser("ls", help="list the collection in id order, optionally filtered")
    ls.add_argument("--filter", action="append", default=[], metavar="SPEC", help="metadata filter, as for search --filter")
    ls.add_argument("--page-size", type=int, default=0, help="images per page (default 100, at most 1000)")
    ls.add_argument("--limit", type=int, default=0, help="stop after this many images (default: all)")
    _add_common(ls)

    st = sub.add_parser("stats", help="collection and cluster statistics")
    _add_common(st)

    ev = sub.add_parser("eval", help="evaluate on a revisitop-format set (mAP Easy/Medium/Hard, mP@k)")
    ev.add_argument("--images", required=True, help="directory with database and query images")
    ev.add_argument("--gnd", required=True, help="ground truth: gnd_*.pkl or the same dict as JSON")
    ev.add_argument("--rerank", action="append", default=None, help="a rerank configuration (repeatable; default none)")
    ev.add_argument("--skip-index", action="store_true", help="the cluster at --address already holds the database")
    _add_whiten_flag(ev, "the collection whitening learned after indexing the database, as `loupe index` does (with --skip-index "
                         "only when given)")
    ev.add_argument("--no-graph", action="store_true", help="do not build the collection's kNN graphs (diffusion builds one per query)")
    ev.add_argument("--batch", type=int, default=16)
    ev.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    _add_common(ev)

    bk = sub.add_parser("backup", help="back the collection up to a directory or s3://bucket/prefix (or list the backups there)",
                        description="A consistent copy taken while the cluster serves: every write acknowledged before the backup "
                                    "starts is in it. The broker writes it: a directory is a path on the broker's machine, S3 "
                                    "credentials come from the broker's AWS_* environment. Without --address a temporary cluster "
                                    "over --data-dir is backed up (offline).")
    bk.add_argument("--to", required=True, metavar="URL", help="directory path (made absolute here) or s3://bucket/prefix")
    bk.add_argument("--full", action="store_true", help="write every chunk again (default: reuse the unchanged chunks of the newest backup there)")
    bk.add_argument("--list", action="store_true", help="list the backups at --to instead (through --address, else read here)")
    _add_common(bk)

    rs = sub.add_parser("restore", help="restore a backup into an empty cluster, with any shard count",
                        description="Every file is checked against the backup's manifest before anything is written; records "
                                    "are re-placed by this cluster's shard count. Without --address the restore goes into "
                                    "--data-dir with --shards (then `loupe up` on it).")
    rs.add_argument("--from", dest="source", required=True, metavar="URL", help="directory path or s3://bucket/prefix")
    rs.add_argument("--backup", default="", metavar="ID", help="backup id (default: the newest complete one; see loupe backup --list)")
    _add_common(rs)

    rh = sub.add_parser("reshard", help="change the shard count of a live collection (records move, nothing is re-extracted)",
                        description="The broker starts the new shards (growing), copies the records whose shard changes while "
                                    "searches and writes go on, switches every data directory's layout, removes the moved "
                                    "records from their old shards and stops the retired shards (shrinking). About 1/N of the "
                                    "records move when one shard is added. --shards is the new count. Without --address a "
                                    "temporary cluster over --data-dir (with its recorded count) is resharded (offline). "
                                    "On Kubernetes see README \"Scaling the collection\".")
    _add_common(rh)

    de = sub.add_parser("demo", help="self-contained demo on photos bundled with scikit-image")
    de.add_argument("--json", action="store_true")

    from cluster.training_cli import add_parsers

    add_parsers(sub)
    return parser


def _add_whiten_flag(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--whitening", choices=("none", *METHODS), default=None,
                   help=f"{what}: verified (the default: learned from pairs that geometric verification finds, see `loupe "
                        "whiten`; by default only from 512 indexed images on, and skipped with a message when no pair "
                        "verifies), pca or none")
    p.add_argument("--whiten", dest="whitening", action="store_const", const="pca", help="the same as --whitening pca")


def _whiten_after_index(client, method: str | None) -> dict[str, Any] | None:
    """``cluster.whitening.after_index``, its reason printed on stderr; the JSON summary or None."""
    w, why = after_index(client, method)
    if why:
        print(f"loupe: {why}", file=sys.stderr)
    return {"method": method or "verified", "sample_size": w.sample_size, "dim": w.dim, "pairs": w.pairs} if w is not None else None


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None, help="broker host:port of a running cluster")
    p.add_argument("--token-file", default=None, metavar="FILE",
                   help="file holding the bearer token for --address (default: env LOUPE_TOKEN, then the file in LOUPE_TOKEN_FILE)")
    p.add_argument("--tls-ca-file", default=None, metavar="PEM", help="CA that signed the broker's certificate → TLS (env LOUPE_TLS_CA_FILE)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_cluster_flags(p, temporary=True)


def _cluster_config(args: argparse.Namespace, **extra: Any):
    from cluster.config import ClusterConfig

    scales = tuple(float(s) for s in args.scales.split(",")) if getattr(args, "scales", None) else None
    values = {
        "shards": args.shards,
        "replication_factor": args.replication_factor,
        "replicas": args.replicas,
        "extractor_threads": args.extractor_threads,
        "shard_threads": args.shard_threads,
        "extractor_runtime": getattr(args, "extractor_runtime", None),
        "extractor_query_runtime": getattr(args, "extractor_query_runtime", None),
        "extractor_batch_images": getattr(args, "extractor_batch_images", None),
        "extractor_batch_wait_ms": getattr(args, "extractor_batch_wait_ms", None),
        "data_dir": args.data_dir,
        "index_factory": args.index_factory,
        "weights": args.weights,
        "attention": args.attention,
        "pooling": args.pooling,
        "scales": scales,
        "max_side": args.max_side,
        "global_max_side": args.global_max_side,
        "regional_from": args.regional_from,
        "regions_per_image": args.regions_per_image,
        "query_local_max_side": args.query_local_max_side,
        "local_layer": args.local_layer,
        "local_scales": tuple(float(x) for x in args.local_scales.split(",")) if args.local_scales else None,
        "ray_address": args.ray_address,
        "approx_min_images": args.approx_min_images,
        "shard_resource": args.shard_resource,
        "extractor_resource": args.extractor_resource,
        **extra,
    }
    return ClusterConfig.build(values)


@contextlib.contextmanager
def _connect(args: argparse.Namespace) -> Iterator[Any]:
    """A client to --address, or to a temporary local cluster started for this command."""
    from loupe.client import RetrievalClient, token_from_env

    if args.address:
        ca = args.tls_ca_file or os.environ.get("LOUPE_TLS_CA_FILE") or None
        with RetrievalClient(args.address, token=token_from_env(args.token_file), tls_ca_file=ca) as client:
            client.wait_ready(10)
            yield client
        return
    from cluster.launcher import Cluster

    _log(args, "starting a temporary local cluster ...")
    # loopback only, and no TLS/auth even when LOUPE_TLS_*/LOUPE_AUTH_* are set for a server
    cfg = dataclasses.replace(
        _cluster_config(args), tls_cert_file="", tls_key_file="", auth_tokens_file="", internal_token_file="",
        internal_tls_cert_file="", internal_tls_key_file="", internal_tls_ca_file="",
    )
    with Cluster(cfg) as cluster, RetrievalClient(cluster.broker_address) as client:
        yield client


def _log(args: argparse.Namespace, msg: str) -> None:
    print(msg, file=sys.stderr if getattr(args, "json", False) else sys.stdout, flush=True)


BROKER_LIMIT_FLAGS = (
    "max_inflight", "max_extract_queue", "rerank_slots", "max_rerank_queue", "shard_budget_s", "shard_budget_fraction", "default_timeout_s", "shutdown_grace_s",
    "extract_hedge_s", "shard_down_grace_s", "write_quorum", "replica_hedge_s",
)


def _broker_config(args: argparse.Namespace):
    """BrokerConfig with the limits given on the command line (ValueError names the setting)."""
    from services.broker.config import BrokerConfig

    return BrokerConfig(**{name: getattr(args, name) for name in BROKER_LIMIT_FLAGS if getattr(args, name, None) is not None})


def cmd_up(args: argparse.Namespace) -> int:
    from cluster.launcher import Cluster

    if args.ray_address_alias:
        args.ray_address = args.ray_address_alias
    if args.data_dir is None:
        args.data_dir = "loupe-data"
    cfg = _cluster_config(
        args, host=args.host, port=args.port, metrics_port=args.metrics_port, metrics_host=args.metrics_host, tls_cert_file=args.tls_cert_file,
        shard_metrics_port=args.shard_metrics_port, extractor_metrics_port=args.extractor_metrics_port,
        tls_key_file=args.tls_key_file, auth_tokens_file=args.auth_tokens_file, internal_token_file=args.internal_token_file,
        insecure_no_auth=args.insecure_no_auth, internal_tls_cert_file=args.internal_tls_cert_file,
        internal_tls_key_file=args.internal_tls_key_file, internal_tls_ca_file=args.internal_tls_ca_file,
    )
    broker_config = _broker_config(args)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    cluster = Cluster(cfg, broker_config)
    # Ray's daemons (GCS, raylet, ...) are started from this thread and inherit its signal mask:
    # with SIGTERM blocked they ignore a SIGTERM sent to the whole process group (systemd, a
    # terminal's kill of the group), so the actors are stopped (shards snapshot) before Ray is;
    # Ray already starts them with SIGINT blocked. ``Cluster.stop`` ends them with SIGKILL
    # after 1 s each. A SIGTERM meanwhile stays pending and stops us once serving.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        cluster.start()
        # ray.init (joining a cluster) installs Ray's C++ SIGTERM handler, which ends the process
        # with status 15 and skips the graceful stop: take the signals back once Ray is up
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    try:
        info = {"broker": cluster.broker_address, "metrics": f"http://{cluster.metrics_address}/metrics", "shards": cfg.shards,
                "replication_factor": cfg.replication_factor, "replicas": cfg.replicas,
                "tls": bool(cfg.tls_cert_file), "auth": bool(cfg.auth_tokens_file), "prometheus_targets": cluster.targets_file}
        if args.json:
            print(json.dumps(info), flush=True)
        else:
            print(f"loupe broker listening on {info['broker']}  (metrics {info['metrics']}); Ctrl-C to stop", flush=True)
        stop.wait()
        _log(args, "shutting down ...")
    finally:
        cluster.stop()
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from cluster.indexing import image_id_for, index_paths, list_images

    paths = list_images(args.directory)
    if not paths:
        raise ValueError(f"directory: no JPEG/PNG/WebP images under {args.directory!r}")
    items = [(image_id_for(p, args.directory), p) for p in paths]
    with _connect(args) as client:
        with tqdm(total=len(items), unit="img", disable=args.json, desc="indexing") as bar:
            rep = index_paths(client, items, args.batch, on_progress=bar.update)
        out: dict[str, Any] = {"indexed": rep.images, "seconds": round(rep.seconds, 3), "images_per_s": round(rep.images_per_s, 2)}
        out["whitening"] = _whiten_after_index(client, args.whitening)
        if not args.no_graph:
            out["graph"] = _graph_summary(client.build_graph())
    if args.json:
        print(json.dumps(out))
    else:
        print(f"indexed {rep.images} images in {rep.seconds:.1f} s ({rep.images_per_s:.2f} images/s)")
    return 0


def _graph_summary(g: Any) -> dict[str, Any]:
    """JSON-able view of a BuildGraphResponse."""
    return {"images": g.images, "regions": g.regions, "k": g.k, "bytes": g.bytes, "seconds": round(g.seconds, 3)}


def cmd_build_graph(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        g = client.build_graph(k=args.k, remove=args.remove)
    out = _graph_summary(g)
    if args.json:
        print(json.dumps(out))
    elif args.remove:
        print("collection graph removed")
    else:
        print(f"collection graphs: {g.images} images, {g.regions} regional nodes, k={g.k}, {g.bytes / 2**20:.1f} MiB, built in {g.seconds:.1f} s")
    return 0


def cmd_whiten(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    with _connect(args) as client:
        if args.remove:
            w = client.fit_whitening(remove=True)
        else:
            with tqdm(unit="img", disable=args.json or args.method != "verified", desc="verified pairs") as bar:
                def progress(searched: int, pairs: int) -> None:
                    bar.update(searched - bar.n)
                    bar.set_postfix(pairs=pairs)

                w = whiten(client, args.method, dim=args.dim, candidates=args.candidates, min_inliers=args.min_inliers,
                           max_queries=args.pair_queries, on_progress=progress)
        out: dict[str, Any] = {"method": None if args.remove else args.method, "sample_size": w.sample_size, "dim": w.dim, "pairs": w.pairs}
        if not args.no_graph:
            out["graph"] = _graph_summary(client.build_graph())
    if args.json:
        print(json.dumps(out))
    elif args.remove:
        print("whitening removed" + ("; graphs rebuilt" if "graph" in out else ""))
    else:
        print(f"whitening ({args.method}): {w.dim}-D, fitted on {w.sample_size} vectors" + (f" and {w.pairs} verified pairs" if w.pairs else "")
              + ("; graphs rebuilt" if "graph" in out else ""))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    if (args.image is None) == (args.id is None):
        raise ValueError("search: give a query image file or --id (one of them)")
    data = None
    if args.image is not None:
        with open(args.image, "rb") as f:
            data = f.read()
    if args.show and data is None:
        raise ValueError("--show: needs a query image file")
    crop = [float(v) for v in args.crop.split(",")] if args.crop else None
    if crop is not None and len(crop) != 4:
        raise ValueError("--crop: expected x1,y1,x2,y2")
    rerank = parse_rerank(args.rerank)
    if args.show:
        rerank.verify.enabled = True
    with _connect(args) as client:
        resp = client.search(image=data, image_id=args.id, include_query=args.include_query, filter=parse_filter(args.filter) if args.filter else None,
                             k=args.k, offset=args.offset, crop=crop, rerank=rerank, return_matches=bool(args.show))
        if args.show:
            _show(args, data, crop, resp, client)
    out = search_json(resp, args.offset)  # one JSON view, shared with the thin client's loupe-client
    results, timings = out["results"], out["timings_ms"]
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{'rank':>4}  {'score':>8}  {'global':>8}  {'inliers':>7}  {'shard':>5}  id")
    for r in results:
        print(f"{r['rank']:>4}  {r['score']:>8.4f}  {r['global']:>8.4f}  {r['inliers']:>7}  {r['shard']:>5}  {r['id']}")
    if resp.partial:
        print(f"partial results: shards {list(resp.missing_shards)} did not answer")
    print("timings (ms): " + ", ".join(f"{k}={v}" for k, v in timings.items()))
    return 0


def _show(args: argparse.Namespace, data: bytes, crop, resp, client) -> None:
    """Write the --show picture; result images are read from the 'path' metadata when present."""
    import cv2

    from cluster.visualize import render_matches
    from services.common.images import decode_image

    max_side = args.max_side or 1024
    results = []
    for r in resp.results[: args.show_top]:
        path = r.metadata.get("path", "")
        img = None
        if path and os.path.exists(path):
            with open(path, "rb") as f:
                img = decode_image(f.read(), max_side=None)
        results.append((r, img))
    canvas = render_matches(decode_image(data, max_side=None), results, crop=crop, max_side=max_side)
    cv2.imwrite(args.show, cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
    _log(args, f"wrote {args.show}")


def _stored(img) -> dict:
    out = {"id": img.id, "shard": img.shard_id, "width": img.width, "height": img.height, "metadata": dict(img.metadata)}
    if img.HasField("vector"):
        from loupe.tensors import from_tensor

        v = from_tensor(img.vector)
        out["vector_dim"], out["vector_head"] = int(v.shape[0]), [round(float(x), 4) for x in v[:4]]
    return out


def cmd_get(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        resp = client.get_images(args.ids, with_vector=args.vector)
    images = [_stored(i) for i in resp.images]
    if args.json:
        print(json.dumps({"images": images, "missing": list(resp.missing), "unavailable": list(resp.unavailable)}))
    else:
        for i in images:
            vec = f"  vector D={i['vector_dim']} {i['vector_head']}..." if "vector_dim" in i else ""
            print(f"{i['id']}  shard {i['shard']}  {i['width']}x{i['height']}  {json.dumps(i['metadata'], ensure_ascii=False)}{vec}")
        for m in resp.missing:
            print(f"{m}  (missing)")
        for m in resp.unavailable:
            print(f"{m}  (shard unavailable)")
    return 0 if not resp.missing and not resp.unavailable else 1


def cmd_ls(args: argparse.Namespace) -> int:
    n = 0
    with _connect(args) as client:
        for img in client.iter_images(page_size=args.page_size, filter=parse_filter(args.filter) if args.filter else None):
            i = _stored(img)
            if args.json:
                print(json.dumps(i, ensure_ascii=False))
            else:
                print(f"{i['id']}  shard {i['shard']}  {i['width']}x{i['height']}  {json.dumps(i['metadata'], ensure_ascii=False)}")
            n += 1
            if args.limit and n >= args.limit:
                break
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        s = client.stats()
    out = stats_json(s)
    shards = out["shards"]
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"images: {s.images}   dim: {s.dim}   whitened: {s.whitened}   diffusion graph: {s.graph_images} images, "
          f"{s.graph_regions} regions\nmodel: {s.model}\nextractors: {', '.join(s.extractors)}")
    for x in shards:
        print(f"  shard {x['shard']}  {x['address']:<21}  {'up' if x['healthy'] else 'DOWN':<4}  {x['images']:>8} images  "
              f"store {x['store_bytes'] / 1e6:8.2f} MB  index {x['index'] or '-'} {x['index_bytes'] / 1e6:.1f} MB RAM")
        if len(x["replicas"]) > 1:
            for r in x["replicas"]:
                lag = f"  missed {r['lag_writes']} writes" if r["lag_writes"] else ""
                progress = f"  catch-up {r['catch_up_progress']:.0%}" if r["state"] == "catching_up" else ""
                print(f"    replica {r['replica']}  {r['address']:<21}  {r['state']:<11}  {r['images']:>8} images  "
                      f"digest {r['digest']}{lag}{progress}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from cluster.evaluate import run_eval

    reranks = args.rerank or ["none"]
    for r in reranks:
        parse_rerank(r)  # fail fast on a bad name

    progress = None if args.no_progress else _progress_bars()

    with _connect(args) as client:
        if args.whitening and args.skip_index:  # a stored collection is whitened only when asked
            _whiten_after_index(client, args.whitening)
        result = _run_eval_with_whitening(client, args, reranks, progress, run_eval)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"database {result['settings']['database']} images, {result['settings']['queries']} queries")
    print(f"{'rerank':<22} {'E mAP':>6} {'M mAP':>6} {'H mAP':>6}  {'M mP@10':>7}  {'p50 ms':>7}")
    for run in result["runs"]:
        print(
            f"{run['rerank']:<22} {run['easy']['map']:>6.2f} {run['medium']['map']:>6.2f} {run['hard']['map']:>6.2f}  "
            f"{run['medium']['mp@10']:>7.2f}  {run['latency_ms']['p50']:>7.1f}"
        )
    print("broker stage p50 ms:")
    for run in result["runs"]:
        print(f"  {run['rerank']:<22} " + ", ".join(f"{k} {v:.0f}" for k, v in run["stage_ms_p50"].items()))
    _print_per_query(result["runs"])
    return 0


def _progress_bars():
    """A progress callback drawing one tqdm bar per stage on stderr (stdout stays clean for --json)."""
    from tqdm import tqdm

    bars: dict = {}

    def progress(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            unit = "img" if stage == "index" else "query"
            bar = bars[stage] = tqdm(total=total, desc=stage, unit=unit, file=sys.stderr, mininterval=1.0, dynamic_ncols=True)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return progress


def _print_per_query(runs: list[dict]) -> None:
    """Per-query AP table: one row per query, Medium (Hard) AP per rerank configuration; "—" where
    the query has no positives under that protocol (it is skipped by the mean)."""
    if not runs:
        return
    width = 13
    print("\nper-query AP, Medium (Hard)")
    for i, r in enumerate(runs, 1):
        print(f"  [{i}] {r['rerank']}")
    print(f"{'query':<28} " + " ".join(f"{'[' + str(i) + ']':>{width}}" for i in range(1, len(runs) + 1)))
    for qi, q in enumerate(runs[0]["queries"]):
        cells = []
        for r in runs:
            ap = r["queries"][qi]["ap"]
            med = "—" if ap["medium"] is None else f"{ap['medium']:.1f}"
            hard = "—" if ap["hard"] is None else f"{ap['hard']:.1f}"
            cells.append(f"{med + ' (' + hard + ')':>{width}}")
        print(f"{q['name']:<28} " + " ".join(cells))


def _run_eval_with_whitening(client, args, reranks, progress, run_eval) -> dict:
    if args.skip_index or args.whitening == "none":
        return run_eval(client, args.images, args.gnd, reranks, batch_size=args.batch, skip_index=args.skip_index,
                        graph=not args.no_graph, progress=progress)
    first = run_eval(client, args.images, args.gnd, [], batch_size=args.batch, graph=False, progress=progress)
    fitted = _whiten_after_index(client, args.whitening)
    result = run_eval(client, args.images, args.gnd, reranks, skip_index=True, graph=not args.no_graph, progress=progress)
    result["settings"]["index_seconds"] = first["settings"]["index_seconds"]
    result["settings"]["whitening"] = fitted
    return result


def _backup_url(url: str) -> str:
    """A local directory path made absolute (the broker needs one); URLs as they are."""
    return url if "://" in url else os.path.abspath(url)


def _needs_target(args: argparse.Namespace, what: str) -> None:
    if not args.address and not args.data_dir:
        raise ValueError(f"{what}: give --address of a running cluster, or --data-dir (and --shards) of a data directory")


def cmd_backup(args: argparse.Namespace) -> int:
    url = _backup_url(args.to)
    if args.list:
        return _print_backups(args, url)
    _needs_target(args, "backup")
    with _connect(args) as client:
        r = client.backup(url, full=args.full)
    out = {"backup_id": r.backup_id, "images": r.images, "shards": r.shards, "chunks": r.chunks, "chunks_reused": r.chunks_reused,
           "bytes": r.bytes, "bytes_written": r.bytes_written, "seconds": round(r.seconds, 3), "incremental_from": r.incremental_from}
    if args.json:
        print(json.dumps(out))
    else:
        inc = f", {r.chunks_reused} of {r.chunks} chunks reused from {r.incremental_from}" if r.incremental_from else ""
        print(f"backup {r.backup_id}: {r.images} images of {r.shards} shards, {r.bytes / 1e6:.1f} MB "
              f"({r.bytes_written / 1e6:.1f} MB written{inc}) in {r.seconds:.1f} s → {url}")
    return 0


def _print_backups(args: argparse.Namespace, url: str) -> int:
    if args.address:
        with _connect(args) as client:
            resp = client.list_backups(url)
    else:  # read the location from here: no cluster needed
        from services.backup.storage import open_storage
        from services.broker.backups import list_backups

        resp = list_backups(open_storage(url))
    rows = [{"backup_id": b.backup_id, "complete": b.complete, "created": b.created, "images": b.images, "shards": b.shards,
             "bytes": b.bytes, "seconds": round(b.seconds, 3), "incremental_from": b.incremental_from, "problem": b.problem}
            for b in resp.backups]
    if args.json:
        print(json.dumps({"url": url, "backups": rows}))
        return 0
    if not rows:
        print(f"no backups at {url}")
    for b in rows:
        if b["complete"]:
            print(f"{b['backup_id']}  {b['created']}  {b['images']:>9} images  {b['shards']} shards  {b['bytes'] / 1e6:9.1f} MB  "
                  f"{b['seconds']:.1f} s" + (f"  (reuses {b['incremental_from']})" if b["incremental_from"] else ""))
        else:
            print(f"{b['backup_id']}  INCOMPLETE" + (f": {b['problem']}" if b["problem"] else " (no manifest: interrupted)"))
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    url = _backup_url(args.source)
    _needs_target(args, "restore")
    with _connect(args) as client:
        r = client.restore(url, backup_id=args.backup)
    out = {"backup_id": r.backup_id, "images": r.images, "source_shards": r.source_shards, "target_shards": r.target_shards,
           "bytes_read": r.bytes_read, "seconds": round(r.seconds, 3), "verify_seconds": round(r.verify_seconds, 3), "resumed": r.resumed}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"restored backup {r.backup_id}{' (completed a stopped restore)' if r.resumed else ''}: {r.images} images, "
              f"{r.source_shards} → {r.target_shards} shards, in {r.seconds:.1f} s (verification {r.verify_seconds:.1f} s)")
    return 0


def cmd_reshard(args: argparse.Namespace) -> int:
    if args.shards is None:
        raise ValueError("reshard: --shards (the new shard count) is required")
    target = args.shards
    if not args.address:
        from services.space.layout import LAYOUT_FILE, read_layout

        _needs_target(args, "reshard")
        if not os.path.exists(os.path.join(args.data_dir, LAYOUT_FILE)):
            raise ValueError(f"reshard: --data-dir {args.data_dir} holds no collection (no {LAYOUT_FILE})")
        args = argparse.Namespace(**{**vars(args), "shards": read_layout(args.data_dir).shards})  # start as recorded
    with _connect(args) as client:
        r = client.reshard(target)
    out = {"from_shards": r.from_shards, "to_shards": r.to_shards, "from_placement": r.from_placement, "to_placement": r.to_placement,
           "records_moved": r.records_moved, "copies_removed": r.copies_removed, "seconds": round(r.seconds, 3),
           "copy_seconds": round(r.copy_seconds, 3)}
    if args.json:
        print(json.dumps(out))
    elif r.from_shards == r.to_shards and r.from_placement == r.to_placement:
        print(f"the collection already has {r.to_shards} shards ({r.to_placement}): nothing moved")
    else:
        print(f"resharded {r.from_shards} → {r.to_shards} shards ({r.from_placement} → {r.to_placement}): {r.records_moved} records "
              f"moved in {r.seconds:.1f} s (copying {r.copy_seconds:.1f} s), {r.copies_removed} old copies removed")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from cluster.demo import run_demo

    return run_demo(json_output=args.json)


def cmd_train(args: argparse.Namespace) -> int:
    from cluster.training_cli import cmd_train as run

    return run(args)


def cmd_train_attention(args: argparse.Namespace) -> int:
    from cluster.training_cli import cmd_train_attention as run

    return run(args)


COMMANDS = {
    "up": cmd_up, "index": cmd_index, "search": cmd_search, "get": cmd_get, "ls": cmd_ls, "stats": cmd_stats, "eval": cmd_eval, "demo": cmd_demo,
    "build-graph": cmd_build_graph, "whiten": cmd_whiten, "backup": cmd_backup, "restore": cmd_restore, "reshard": cmd_reshard, "train": cmd_train, "train-attention": cmd_train_attention,
}


def main(argv: Sequence[str] | None = None) -> int:
    from services.common.errors import LoupeError

    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except LoupeError as exc:  # raised here, not by the broker: `loupe backup --list` without --address
        print(f"loupe {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        print(f"loupe {args.command}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, OSError, TimeoutError) as exc:
        print(f"loupe {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
