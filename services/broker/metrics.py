"""Prometheus metrics of the broker (base units; every name the dashboard uses is tested)."""

from __future__ import annotations

import contextlib

from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from services.common.metrics import RoleProcessCollector

if TYPE_CHECKING:
    from services.broker.admission import Slots
    from services.broker.replicas import ReplicatedShard

STAGES = ("extract", "fanout", "merge", "expand", "diffuse", "verify", "total")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class BrokerMetrics:
    """The broker's metrics in their own registry (several brokers may share a process in tests)."""

    registry: CollectorRegistry
    requests: Counter
    stage_seconds: Histogram
    request_seconds: Histogram
    inflight: Gauge
    shard_vectors: Gauge
    shard_failures: Counter
    shard_store_bytes: Gauge
    shard_up: Gauge
    extractor_up: Gauge
    backend_moves: Counter
    images_added: Counter
    diffusion_iterations: Histogram
    graph_images: Gauge
    partial_responses: Counter
    verify_candidates: Counter
    verify_verified: Counter
    query_confidence: Histogram
    add_batch_images: Histogram
    replica_up: Gauge
    replica_in_sync: Gauge
    replica_lag: Gauge
    replica_catch_up: Gauge
    replicas_in_sync: Gauge
    replication_factor: Gauge
    admission_in_use: Gauge
    admission_waiting: Gauge
    admission_capacity: Gauge
    admission_max_waiting: Gauge

    @classmethod
    def create(cls) -> "BrokerMetrics":
        r = CollectorRegistry()
        r.register(RoleProcessCollector("broker", "0"))
        m = cls(
            registry=r,
            requests=Counter(
                "loupe_requests", "RPCs handled by the broker, by method and gRPC status code.",
                ["grpc_method", "grpc_code"], registry=r,
            ),
            stage_seconds=Histogram(
                "loupe_stage_duration_seconds", "Seconds spent per search stage.",
                ["stage"], buckets=LATENCY_BUCKETS, registry=r,
            ),
            request_seconds=Histogram(
                "loupe_request_duration_seconds", "End-to-end seconds per RPC, by method.",
                ["grpc_method"], buckets=LATENCY_BUCKETS, registry=r,
            ),
            inflight=Gauge("loupe_inflight_requests", "RPCs currently being handled, by method.", ["grpc_method"], registry=r),
            shard_vectors=Gauge("loupe_shard_vectors", "Images (global vectors) stored per shard.", ["shard"], registry=r),
            shard_failures=Counter(
                "loupe_shard_failures", "Shard calls that failed or timed out, by shard and reason.",
                ["shard", "reason"], registry=r,
            ),
            shard_store_bytes=Gauge("loupe_shard_store_bytes", "Bytes each shard's store occupies on disk.", ["shard"], registry=r),
            shard_up=Gauge(
                "loupe_shard_up", "1 when the shard answered the broker's last health check (Stats call), else 0 (by shard).",
                ["shard"], registry=r,
            ),
            extractor_up=Gauge(
                "loupe_extractor_up", "1 when the extractor replica answered the broker's last health check, else 0 (by replica).",
                ["replica"], registry=r,
            ),
            backend_moves=Counter(
                "loupe_backend_moves", "Times the broker found a shard or extractor replica at a new address (by role).",
                ["role"], registry=r,
            ),
            images_added=Counter("loupe_images_added", "Images stored through AddImages.", registry=r),
            diffusion_iterations=Histogram(
                "loupe_diffusion_cg_iterations", "Conjugate-gradient iterations per diffusion solve.",
                buckets=(1, 2, 5, 10, 15, 20, 30, 50), registry=r,
            ),
            graph_images=Gauge("loupe_graph_images", "Images covered by the collection's kNN graph (0 = none).", registry=r),
            partial_responses=Counter(
                "loupe_partial_responses", "Search responses marked partial because a shard failed or timed out (count).", registry=r,
            ),
            verify_candidates=Counter(
                "loupe_verify_candidates", "Candidates geometrically verified (pairs matched with RANSAC; count).", registry=r,
            ),
            verify_verified=Counter(
                "loupe_verify_verified", "Verified candidates that reached the inlier threshold (count).", registry=r,
            ),
            query_confidence=Histogram(
                "loupe_query_confidence", "Query confidence of verified searches (0..1; below 0.5 = no true match).",
                buckets=(0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0), registry=r,
            ),
            add_batch_images=Histogram(
                "loupe_add_batch_images", "Images per AddImages message, each extracted by the replicas as one batch (count).",
                buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r,
            ),
            replica_up=Gauge(
                "loupe_shard_replica_up", "1 when the shard replica answered the broker's last health check, else 0.",
                ["shard", "replica"], registry=r,
            ),
            replica_in_sync=Gauge(
                "loupe_shard_replica_in_sync", "1 when the shard replica holds every acknowledged write and serves reads, else 0.",
                ["shard", "replica"], registry=r,
            ),
            replica_lag=Gauge(
                "loupe_shard_replica_lag_writes", "Acknowledged writes the shard replica missed since it fell out of sync (count).",
                ["shard", "replica"], registry=r,
            ),
            replica_catch_up=Gauge(
                "loupe_shard_replica_catch_up_ratio", "Progress of the shard replica's running catch-up (0..1; 1 = none running).",
                ["shard", "replica"], registry=r,
            ),
            replicas_in_sync=Gauge(
                "loupe_shard_replicas_in_sync", "Replicas of the shard that are in sync and serve reads (count).", ["shard"], registry=r,
            ),
            replication_factor=Gauge(
                "loupe_shard_replication_factor", "Replicas the shard is configured with (count).", ["shard"], registry=r,
            ),
            admission_in_use=Gauge(
                "loupe_admission_in_use", "Slots held now, by pool: rerank = searches with rerank stages between admission and "
                "answer, extract = images being described (count).", ["pool"], registry=r,
            ),
            admission_waiting=Gauge(
                "loupe_admission_waiting", "Callers waiting for a slot, by pool (extract: searches and indexing together; count).",
                ["pool"], registry=r,
            ),
            admission_capacity=Gauge("loupe_admission_capacity", "Slots of each pool (count).", ["pool"], registry=r),
            admission_max_waiting=Gauge(
                "loupe_admission_max_waiting", "Callers of each class allowed to wait, by pool; beyond: RESOURCE_EXHAUSTED (count).",
                ["pool"], registry=r,
            ),
        )
        for stage in STAGES:  # every stage's series exists from the start (dashboards, alerts)
            m.stage_seconds.labels(stage)
        return m

    def observe_slots(self, pool: str, slots: "Slots") -> None:
        """Export an admission pool's state (read at each scrape)."""
        self.admission_in_use.labels(pool).set_function(lambda: slots.in_use)
        self.admission_waiting.labels(pool).set_function(lambda: slots.waiting())
        self.admission_capacity.labels(pool).set(slots.capacity)
        self.admission_max_waiting.labels(pool).set(slots.max_waiting)

    def observe_replicas(self, shard: "ReplicatedShard") -> None:
        """Publish the state of every replica of ``shard``."""
        sid = str(shard.shard_id)
        for j, state in enumerate(shard.states):
            labels = (sid, str(j))
            self.replica_up.labels(*labels).set(1 if state.up else 0)
            self.replica_in_sync.labels(*labels).set(1 if state.readable else 0)
            self.replica_lag.labels(*labels).set(state.missed)
            self.replica_catch_up.labels(*labels).set(state.progress)
        self.replicas_in_sync.labels(sid).set(sum(1 for s in shard.states if s.readable and s.up))
        self.replication_factor.labels(sid).set(len(shard.states))

    def forget_shard(self, shard_id: int, replicas: int) -> None:
        """Drop the series of a shard a reshard retired (else they would report its last state forever)."""
        sid = str(shard_id)
        for gauge in (self.shard_up, self.shard_vectors, self.shard_store_bytes, self.replicas_in_sync, self.replication_factor):
            with contextlib.suppress(KeyError):
                gauge.remove(sid)
        for j in range(replicas):
            for gauge in (self.replica_up, self.replica_in_sync, self.replica_lag, self.replica_catch_up):
                with contextlib.suppress(KeyError):
                    gauge.remove(sid, str(j))

    def serve(self, host: str, port: int) -> int:
        """Expose ``/metrics`` over HTTP; returns the bound port (``port=0`` picks one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return int(server.server_port)

    def close(self) -> None:
        """Stop the HTTP exporter if it runs."""
        http = getattr(self, "_http", None)
        if http is not None:
            http.shutdown()
            http.server_close()
