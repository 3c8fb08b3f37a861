#!/usr/bin/env python3
"""Generate loupe's Grafana dashboard: ``helm/loupe/files/dashboard.json`` (the one copy).

Plain Python dicts rather than grafanalib / grafana-foundation-sdk: the dashboard is ~30 time
series panels, the JSON model is stable and documented, and a dependency (and its lag behind
Grafana's schema) buys nothing here. Every panel reads ``$datasource``, sets a unit, and its
rate windows use ``$__rate_interval``; tests/ops checks all three, that every metric it queries
is exported, and (against a live cluster and Prometheus) that every query returns data.

    .venv/bin/python scripts/gen_dashboard.py          # rewrite the JSON
    .venv/bin/python scripts/gen_dashboard.py --check  # exit 1 if the committed JSON is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "helm" / "loupe" / "files" / "dashboard.json"
DS = {"type": "prometheus", "uid": "$datasource"}
RI = "$__rate_interval"
NS = 'namespace=~"$namespace"'
SHARD = f'{NS}, shard=~"$shard"'
INST = f'{NS}, instance=~"$instance"'
NOT_OK = f'{NS}, grpc_code!="OK"'


def _rate(metric: str, sel: str = NS) -> str:
    return f"rate({metric}{{{sel}}}[{RI}])"


def _quantile(q: float, metric: str, by: str = "", sel: str = NS) -> str:
    labels = ", ".join(["le"] + ([by] if by else []))
    return f"histogram_quantile({q}, sum by ({labels}) ({_rate(metric + '_bucket', sel)}))"


def target(expr: str, legend: str) -> dict:
    return {"expr": expr, "legendFormat": legend, "datasource": DS}


def _admission_targets(pool: str, legends: tuple[str, str, str, str]) -> list[dict]:
    """The four ``loupe_admission_*`` gauges of one admission pool: in use, waiting, capacity, queue limit."""
    gauges = ("in_use", "waiting", "capacity", "max_waiting")
    return [target(f'max(loupe_admission_{g}{{{NS}, pool="{pool}"}})', legend) for g, legend in zip(gauges, legends)]


def panel(title: str, unit: str, targets: list[dict], description: str, *, min0: bool = True, max1: bool = False) -> dict:
    """A time series panel (position and ids are filled in by ``layout``)."""
    defaults: dict = {"unit": unit, "custom": {"lineWidth": 1, "fillOpacity": 10, "showPoints": "never"}}
    if min0:
        defaults["min"] = 0
    if max1:
        defaults["max"] = 1
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DS,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}, "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": [dict(t, refId=chr(ord("A") + i)) for i, t in enumerate(targets)],
    }


def rows() -> list[tuple[str, list[dict]]]:
    """(row title, panels) in display order."""
    traffic = [
        panel("Requests per second by method", "reqps",
              [target(f"sum by (grpc_method) ({_rate('loupe_requests_total')})", "{{grpc_method}}")],
              "Broker RPCs per second, by gRPC method."),
        panel("Error ratio by code", "percentunit",
              [target(f"sum by (namespace, grpc_code) ({_rate('loupe_requests_total', NOT_OK)}) "
                      f"/ ignoring (grpc_code) group_left sum by (namespace) ({_rate('loupe_requests_total')})", "{{grpc_code}}")],
              "Share of broker RPCs that did not end OK, by gRPC status code. INVALID_ARGUMENT/NOT_FOUND are the callers' mistakes; "
              "UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, DATA_LOSS, RESOURCE_EXHAUSTED are the cluster's (alert LoupeErrorRatioHigh)."),
        panel("In-flight requests", "short",
              [target(f"sum by (grpc_method) (loupe_inflight_requests{{{NS}}})", "{{grpc_method}}")],
              "RPCs the broker is handling right now."),
        panel("Images added per second", "ops",
              [target(f"sum({_rate('loupe_images_added_total')})", "images/s")],
              "Images stored through AddImages (after extraction, acknowledged by their shard)."),
    ]
    admission = [
        panel("Rerank budget: searches in flight and waiting", "short",
              _admission_targets("rerank", ("in flight", "waiting", "slots (--rerank-slots)", "queue limit (--max-rerank-queue)")),
              "Searches with rerank stages (verify, diffuse, expand) the broker works on, each from admission to answer, and those "
              "waiting for a slot; with the queue at its limit, more are refused RESOURCE_EXHAUSTED before their extraction."),
        panel("Extraction slots in the broker: in use and waiting", "short",
              _admission_targets("extract", ("in use", "waiting (searches + indexing)", "slots", "queue limit per class (--max-extract-queue)")),
              "Images the broker has sent to the extractor replicas and images waiting for a slot (searches first); a full queue "
              "refuses more of its class with RESOURCE_EXHAUSTED."),
    ]
    latency = [
        panel("Search latency, end to end", "s",
              [target(_quantile(q, "loupe_request_duration_seconds", sel=NS + ', grpc_method="Search"'), f"p{int(q * 100)}")
               for q in (0.5, 0.95, 0.99)],
              "Search latency at the broker, every rerank stage included. Objective: p99 under 2.5 s (alert LoupeSearchLatencyHigh)."),
        panel("p95 latency per stage", "s",
              [target(_quantile(0.95, "loupe_stage_duration_seconds", "stage"), "{{stage}}")],
              "Seconds per search stage: extract (query descriptors), fanout (shard searches), merge, expand (αQE/DBA), "
              "regional_match (global + best regional score), verify (local features + RANSAC), diffuse; total = the whole search; extract also counts AddImages batches."),
        panel("p99 latency per stage", "s",
              [target(_quantile(0.99, "loupe_stage_duration_seconds", "stage"), "{{stage}}")],
              "As the p95 panel, at the 99th percentile: the stage that dominates the tail."),
        panel("p99 latency by method", "s",
              [target(_quantile(0.99, "loupe_request_duration_seconds", "grpc_method"), "{{grpc_method}}")],
              "End-to-end p99 of every broker RPC (AddImages, BuildGraph, FitWhitening are long by nature)."),
    ]
    rerank = [
        panel("Verification: candidates and verified per second", "ops",
              [target(f"sum({_rate('loupe_verify_candidates_total')})", "candidates"),
               target(f"sum({_rate('loupe_verify_verified_total')})", "verified")],
              "Candidates geometrically verified per second, and those that reached the inlier threshold."),
        panel("Query confidence (p10, median)", "percentunit",
              [target(_quantile(0.1, "loupe_query_confidence"), "p10"), target(_quantile(0.5, "loupe_query_confidence"), "median")],
              "Confidence of verified searches (best verified result). Below 0.5 the query most likely has no true match in the collection.",
              max1=True),
        panel("Diffusion: CG iterations (p95) and graph size", "short",
              [target(_quantile(0.95, "loupe_diffusion_cg_iterations"), "CG iterations p95"),
               target(f"max(loupe_graph_images{{{NS}}})", "images in the kNN graph")],
              "Conjugate-gradient iterations per diffusion solve (cap 20) and images covered by the collection's kNN graph (0 = rebuilt per query)."),
    ]
    shards = [
        panel("Shard search latency p95", "s",
              [target(_quantile(0.95, "loupe_shard_search_duration_seconds", "shard", SHARD), "shard {{shard}}")],
              "Seconds one shard spends on a Search call (faiss + metadata), measured in the shard."),
        panel("Images per shard", "short",
              [target(f"max by (shard) (loupe_shard_images{{{SHARD}}})", "shard {{shard}}")],
              "Images (global vectors) each shard holds (its fullest copy)."),
        panel("Shard imbalance (max / mean images)", "short",
              [target(f"max by (namespace) (loupe_shard_images{{{NS}}}) / avg by (namespace) (loupe_shard_images{{{NS}}})", "max / mean")],
              "1.0 = perfectly even. Placement hashes ids, so a large value means a shard lost data or an id scheme collides."),
        panel("Shard health (1 = up)", "short",
              [target(f"min by (shard) (loupe_shard_up{{{SHARD}}})", "shard {{shard}}")],
              "Whether each shard answers the broker's health check (a Stats call every 5 s), whichever pods are scraped "
              "(alert LoupeShardDown).", max1=True),
        panel("Partial answers and shard failures per second", "ops",
              [target(f"sum({_rate('loupe_partial_responses_total')})", "partial answers"),
               target(f"sum by (shard, reason) ({_rate('loupe_shard_failures_total', SHARD)})", "shard {{shard}} {{reason}}")],
              "Searches answered without some shard, and failed shard calls by reason (DEADLINE_EXCEEDED = timeout) (alert LoupePartialAnswers)."),
    ]
    replication = [
        panel("Shard copies in sync, against the replication factor", "short",
              [target(f"min by (shard) (loupe_shard_replicas_in_sync{{{SHARD}}})", "shard {{shard}} in sync"),
               target(f"max by (shard) (loupe_shard_replication_factor{{{SHARD}}})", "shard {{shard}} configured")],
              "Copies of each shard that hold every acknowledged write and serve reads; fewer than configured = under-replicated "
              "(a copy is down, hung, or catching up; alert LoupeShardUnderReplicated)."),
        panel("Replica lag and catch-up", "short",
              [target(f"max by (shard, replica) (loupe_shard_replica_lag_writes{{{SHARD}}})", "shard {{shard}} r{{replica}} missed writes"),
               target(f"min by (shard, replica) (loupe_shard_replica_catch_up_ratio{{{SHARD}}})", "shard {{shard}} r{{replica}} catch-up done")],
              "Acknowledged writes each copy missed since it fell out of sync (alert LoupeShardReplicaLagging), and the progress "
              "of its running catch-up from an in-sync peer (1 = none running)."),
    ]
    extractors = [
        panel("Images described per second by replica", "ops",
              [target(f"sum by (replica) ({_rate('loupe_extractor_images_total')})", "replica {{replica}}")],
              "Images each extractor replica turned into descriptors (queries and indexing)."),
        panel("Extractor queue: calls in the replica and capacity", "short",
              [target(f"sum by (replica) (loupe_extractor_queue_depth{{{NS}}})", "in replica {{replica}}"),
               target(f"sum by (replica) (loupe_extractor_queue_capacity{{{NS}}})", "capacity {{replica}}")],
              "Extract calls waiting for or holding a replica's model, against its worker slots (alert LoupeExtractorQueueSaturated)."),
        panel("Extractor queue wait p95", "s",
              [target(_quantile(0.95, "loupe_extractor_queue_wait_seconds", "replica"), "replica {{replica}}")],
              "Seconds a call waited for the replica's model (one image at a time per replica)."),
        panel("Extract latency per replica (p50, p95)", "s",
              [target(_quantile(0.5, "loupe_extractor_extract_duration_seconds", "replica"), "p50 replica {{replica}}"),
               target(_quantile(0.95, "loupe_extractor_extract_duration_seconds", "replica"), "p95 replica {{replica}}")],
              "Seconds of one Extract call inside the replica, queue wait included."),
        panel("Extractor replica health (1 = up) and backend moves", "short",
              [target(f"min by (replica) (loupe_extractor_up{{{NS}}})", "replica {{replica}} up"),
               target(f"sum by (role) (increase(loupe_backend_moves_total{{{NS}}}[$__rate_interval]))", "{{role}} moved")],
              "Whether each replica answers the broker's gRPC health check (every 5 s; alert LoupeExtractorReplicaDown), and "
              "shards/replicas the broker found at a new address (an actor restarted on another port or node)."),
        panel("AddImages batch size", "short",
              [target(f"sum({_rate('loupe_add_batch_images_sum')}) / sum({_rate('loupe_add_batch_images_count')})", "mean"),
               target(_quantile(0.95, "loupe_add_batch_images"), "p95")],
              "Images per AddImages message: each message is extracted as one batch across the replicas, then written per shard."),
        panel("Extract failures per second by reason", "ops",
              [target(f"sum by (reason) ({_rate('loupe_extractor_failures_total')})", "{{reason}}")],
              "Images the replicas refused: InvalidImage (not decodable), ImageTooLarge (pixel limit), InvalidArgument (bad crop)."),
    ]
    storage = [
        panel("Writes per second by shard", "ops",
              [target(f"max by (shard, op) ({_rate('loupe_shard_writes_total', SHARD)})", "shard {{shard}} {{op}}")],
              "Images added and deleted per second in each shard's store (every copy of a shard stores each write)."),
        panel("Durable commit (fsync) latency p99", "s",
              [target(_quantile(0.99, "loupe_shard_commit_duration_seconds", "shard", SHARD), "shard {{shard}}")],
              "Seconds of an LMDB commit with fsync: every acknowledged write waits for it."),
        panel("Bytes by shard: on disk, in memory, descriptors", "bytes",
              [target(f"sum by (shard) (loupe_shard_storage_bytes{{{SHARD}}})", "disk {{shard}}"),
               target(f"sum by (shard) (loupe_shard_index_memory_bytes{{{SHARD}}})", "faiss memory {{shard}}"),
               target(f"sum by (shard) (loupe_shard_feature_bytes{{{SHARD}}})", "descriptors {{shard}}")],
              "The store's size on disk, the faiss index's memory, and the raw descriptor bytes it holds."),
        panel("Data volume free", "percentunit",
              [target(f"min by (shard) (loupe_shard_disk_free_bytes{{{SHARD}}} / loupe_shard_disk_capacity_bytes{{{SHARD}}})", "shard {{shard}}")],
              "Free share of each shard's data filesystem (alerts LoupeStorageNearlyFull < 10 %, LoupeStorageFull < 3 %).", max1=True),
        panel("Recovery time at last start", "s",
              [target(f"max by (shard) (loupe_shard_startup_seconds{{{SHARD}}})", "shard {{shard}}")],
              "Seconds a shard took at its last start to load its faiss snapshot and replay the changes after it."),
    ]
    resources = [
        panel("CPU by role (1 = one core)", "percentunit",
              [target(f"sum by (role, member) ({_rate('loupe_process_cpu_seconds_total', INST)})", "{{role}} {{member}}")],
              "CPU seconds per second of each process: the broker, every shard actor and extractor replica.", min0=True),
        panel("Resident memory by role", "bytes",
              [target(f"sum by (role, member) (loupe_process_resident_memory_bytes{{{INST}}})", "{{role}} {{member}}")],
              "Resident set size of each process."),
        panel("Actor restarts", "short",
              [target(f"max by (role, member) (loupe_actor_restarts{{{INST}}})", "{{role}} {{member}}")],
              "Times Ray restarted each shard actor / extractor replica since the cluster started (alert LoupeActorRestarting)."),
        panel("Scrape targets up by role", "short",
              [target(f'sum by (role) (up{{{NS}, role!=""}})', "{{role}} up"),
               target(f'count by (role) (up{{{NS}, role!=""}})', "{{role}} targets")],
              "/metrics exporters Prometheus reaches, against the targets it knows, per role. Scrape health only: in Kubernetes "
              "a spare shard pod is a target that never answers, so shard health is the broker's loupe_shard_up (Shards row)."),
    ]
    return [("Traffic", traffic), ("Admission", admission), ("Latency", latency), ("Rerank", rerank), ("Shards", shards), ("Replication", replication),
            ("Extractors", extractors), ("Storage", storage), ("Resources", resources)]


def _variable(name: str, label: str, query: str) -> dict:
    return {
        "type": "query", "name": name, "label": label, "datasource": DS,
        "query": {"query": query, "refId": name}, "definition": query,
        "includeAll": True, "allValue": ".*", "multi": True, "refresh": 2, "sort": 1, "hide": 0,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "options": [],
    }


def templating() -> dict:
    return {"list": [
        {"type": "datasource", "name": "datasource", "label": "Data source", "query": "prometheus", "hide": 0,
         "current": {}, "options": [], "refresh": 1, "regex": ""},
        _variable("namespace", "Namespace", "label_values(loupe_process_cpu_seconds_total, namespace)"),
        _variable("instance", "Instance", 'label_values(loupe_process_cpu_seconds_total{namespace=~"$namespace"}, instance)'),
        _variable("shard", "Shard", 'label_values(loupe_shard_images{namespace=~"$namespace"}, shard)'),
    ]}


def layout(sections: list[tuple[str, list[dict]]], width: int = 6, height: int = 8) -> list[dict]:
    """Rows then their panels on a 24-column grid, 4 panels per line; ids in order."""
    out: list[dict] = []
    y, next_id = 0, 1
    for title, panels in sections:
        out.append({"type": "row", "title": title, "collapsed": False, "id": next_id, "panels": [],
                    "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        next_id += 1
        y += 1
        for i, p in enumerate(panels):
            col = i % (24 // width)
            if i and col == 0:
                y += height
            out.append(dict(p, id=next_id, gridPos={"h": height, "w": width, "x": col * width, "y": y}))
            next_id += 1
        y += height
    return out


def build_dashboard() -> dict:
    """The whole dashboard as a dict (Grafana JSON model, schemaVersion 39)."""
    return {
        "title": "loupe",
        "uid": "loupe-overview",
        "description": "loupe image retrieval: broker traffic and latency, rerank quality, shards, extractors, storage, resources. "
                       "Generated by scripts/gen_dashboard.py; see docs/operations.md.",
        "tags": ["loupe"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "browser",
        "annotations": {"list": []},
        "templating": templating(),
        "panels": layout(rows()),
    }


def render_json() -> str:
    return json.dumps(build_dashboard(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 when the committed dashboard differs from the generated one")
    ap.add_argument("--out", default=str(OUT), help=f"output file (default {OUT.relative_to(REPO)})")
    args = ap.parse_args(argv)
    text = render_json()
    out = Path(args.out)
    if args.check:
        if not out.exists() or out.read_text() != text:
            print(f"{out} is stale: run .venv/bin/python scripts/gen_dashboard.py", file=sys.stderr)
            return 1
        return 0
    out.write_text(text)
    print(f"wrote {out} ({sum(p['type'] != 'row' for p in build_dashboard()['panels'])} panels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
