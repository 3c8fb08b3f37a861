"""Prometheus metrics of the shard and extractor roles, and what every role exports about itself.

How they reach Prometheus: every Ray actor (shard, extractor replica) serves its own
``/metrics`` on a port of its own (``--shard-metrics-port`` / ``--extractor-metrics-port``,
0 = any free port), from its own ``CollectorRegistry``. The actor registers that address in the
Ray registry next to its gRPC address; ``loupe up`` writes them to a Prometheus file_sd targets
file, and in Kubernetes the chart scrapes the same ports on the worker pods. Ray's own metrics
export is not used: it needs the dashboard agent of ``ray[default]``.

Every metric carries the label of its owner (``shard`` or ``replica``) so that the series stay
apart whatever the scrape adds (file_sd labels or pod labels); process metrics carry ``role`` and
``member``. Base units throughout; help strings state the unit.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
COMMIT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
ROLES = ("broker", "shard", "extractor")

log = logging.getLogger(__name__)


class RoleProcessCollector(Collector):
    """The process's CPU seconds, resident memory, start time and open fds, labelled by role.

    Wraps ``prometheus_client.ProcessCollector`` (Linux ``/proc``) and re-exports its samples as
    ``loupe_process_*`` with ``role`` and ``member`` labels, so the dashboard can group by role
    without depending on how the target was discovered.
    """

    def __init__(self, role: str, member: str, restarts: Callable[[], int] = lambda: 0) -> None:
        if role not in ROLES:
            raise ValueError(f"role: must be one of {ROLES}, got {role!r}")
        self.role, self.member = role, member
        self._inner = ProcessCollector(registry=None)
        self._restarts = restarts

    def collect(self) -> Iterable[Metric]:
        labels = ["role", "member"]
        values = [self.role, self.member]
        renamed = {
            "process_cpu_seconds": (CounterMetricFamily, "loupe_process_cpu_seconds", "CPU seconds (user + system) used by the process."),
            "process_resident_memory_bytes": (GaugeMetricFamily, "loupe_process_resident_memory_bytes", "Resident memory of the process in bytes."),
            "process_start_time_seconds": (GaugeMetricFamily, "loupe_process_start_time_seconds", "Start time of the process, seconds since the Unix epoch."),
            "process_open_fds": (GaugeMetricFamily, "loupe_process_open_fds", "Open file descriptors of the process (count)."),
        }
        for family in self._inner.collect():
            if family.name not in renamed:
                continue
            cls, name, doc = renamed[family.name]
            out = cls(name, doc, labels=labels)
            for s in family.samples:
                if s.name in (family.name, family.name + "_total"):
                    out.add_metric(values, s.value)
            yield out
        g = GaugeMetricFamily(
            "loupe_actor_restarts", "Times this role member was restarted since the cluster started (count; 0 for the broker).", labels=labels,
        )
        g.add_metric(values, float(self._restarts()))
        yield g


@dataclass
class MetricsServer:
    """A running ``/metrics`` HTTP exporter of one registry."""

    registry: CollectorRegistry
    port: int = 0
    _server: Any = field(default=None, repr=False)

    def close(self) -> None:
        """Stop the exporter (idempotent)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> MetricsServer:
    """Expose ``registry`` at ``http://host:port/metrics``; ``port=0`` picks a free port.

    A fixed ``port`` that is taken (two actors of one role on one machine) falls back to a free
    port: the registry's address, hence the targets file, names the port actually bound.
    """
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        if port == 0:
            raise
        server, _thread = start_http_server(0, addr=host, registry=registry)
        log.warning("metrics port %s:%d unavailable (%s): serving /metrics on port %d instead", host, port, exc, server.server_port)
    return MetricsServer(registry, int(server.server_port), server)


# --- shards ------------------------------------------------------------------------------
@dataclass
class ShardMetrics:
    """Metrics of one index shard (its own registry; label ``shard``)."""

    shard: str
    registry: CollectorRegistry
    search_seconds: Histogram
    writes: Counter
    commit_seconds: Histogram
    verify_seconds: Histogram

    @classmethod
    def create(cls, shard_id: int, restarts: Callable[[], int] = lambda: 0) -> "ShardMetrics":
        r = CollectorRegistry()
        sid = str(shard_id)
        r.register(RoleProcessCollector("shard", sid, restarts))
        return cls(
            shard=sid,
            registry=r,
            search_seconds=Histogram(
                "loupe_shard_search_duration_seconds", "Seconds one shard spends on a Search call.",
                ["shard"], buckets=LATENCY_BUCKETS, registry=r,
            ),
            writes=Counter(
                "loupe_shard_writes", "Images written to the shard's store, by operation (add, delete) (count).",
                ["shard", "op"], registry=r,
            ),
            commit_seconds=Histogram(
                "loupe_shard_commit_duration_seconds", "Seconds of one durable store commit (LMDB commit with fsync).",
                ["shard"], buckets=COMMIT_BUCKETS, registry=r,
            ),
            verify_seconds=Histogram(
                "loupe_shard_verify_duration_seconds", "Seconds one shard spends on a Verify call (its candidates' matching and fitting).",
                ["shard"], buckets=LATENCY_BUCKETS, registry=r,
            ),
        )

    def __post_init__(self) -> None:
        self.search_seconds.labels(self.shard)
        self.commit_seconds.labels(self.shard)
        self.verify_seconds.labels(self.shard)
        for op in ("add", "delete"):
            self.writes.labels(self.shard, op)

    def watch(self, state: Callable[[], "ShardState | None"]) -> None:
        """Export the shard's holdings, read from ``state()`` at every scrape."""
        self.registry.register(ShardStateCollector(self.shard, state))


@dataclass(frozen=True)
class ShardState:
    """What a shard holds, read once per scrape."""

    images: int
    regional_vectors: int
    local_features: int
    feature_bytes: int
    storage_bytes: int
    index_bytes: int
    disk_free_bytes: int
    disk_capacity_bytes: int
    startup_seconds: float
    startup_replayed: int


def shard_state(index: Any) -> ShardState:
    """``ShardState`` of a ``services.index.shard_index.ShardIndex``."""
    s = index.stats()
    st = os.statvfs(index.store.path)
    return ShardState(
        images=s["images"], regional_vectors=s["regional_vectors"], local_features=s["local_features"],
        feature_bytes=s["feature_bytes"], storage_bytes=s["store_bytes"], index_bytes=s["index_bytes"],
        disk_free_bytes=st.f_bavail * st.f_frsize, disk_capacity_bytes=st.f_blocks * st.f_frsize,
        startup_seconds=index.startup.seconds, startup_replayed=index.startup.replayed,
    )


SHARD_GAUGES = {
    "images": ("loupe_shard_images", "Images (global vectors) the shard holds (count)."),
    "regional_vectors": ("loupe_shard_regional_vectors", "Regional vectors the shard holds (count)."),
    "local_features": ("loupe_shard_local_features", "Local features (keypoints) the shard holds (count)."),
    "feature_bytes": ("loupe_shard_feature_bytes", "Bytes of stored descriptors (global, regional, local) in the shard."),
    "storage_bytes": ("loupe_shard_storage_bytes", "Bytes the shard's store occupies on disk."),
    "index_bytes": ("loupe_shard_index_memory_bytes", "Bytes of memory held by the shard's faiss index (estimate)."),
    "disk_free_bytes": ("loupe_shard_disk_free_bytes", "Bytes free to unprivileged writers on the shard's data filesystem."),
    "disk_capacity_bytes": ("loupe_shard_disk_capacity_bytes", "Size of the shard's data filesystem in bytes."),
    "startup_seconds": ("loupe_shard_startup_seconds", "Seconds the shard took at its last start to load its snapshot and replay later changes."),
    "startup_replayed": ("loupe_shard_startup_replayed_changes", "Store changes replayed into the index at the shard's last start (count)."),
}


class ShardStateCollector(Collector):
    """Gauges of a shard's holdings from one ``ShardState`` per scrape (nothing while unopened)."""

    def __init__(self, shard: str, state: Callable[[], ShardState | None]) -> None:
        self.shard = shard
        self.state = state

    def collect(self) -> Iterable[Metric]:
        st = self.state()
        if st is None:
            return
        for attr, (name, doc) in SHARD_GAUGES.items():
            g = GaugeMetricFamily(name, doc, labels=["shard"])
            g.add_metric([self.shard], float(getattr(st, attr)))
            yield g

    def describe(self) -> Iterable[Metric]:
        for name, doc in SHARD_GAUGES.values():
            yield GaugeMetricFamily(name, doc, labels=["shard"])


# --- extractors --------------------------------------------------------------------------
@dataclass
class ExtractorMetrics:
    """Metrics of one extractor replica (its own registry; label ``replica``)."""

    replica: str
    registry: CollectorRegistry
    images: Counter
    failures: Counter
    extract_seconds: Histogram
    queue_wait_seconds: Histogram
    queue_depth: Gauge
    queue_capacity: Gauge

    @classmethod
    def create(cls, replica_id: int, capacity: int, restarts: Callable[[], int] = lambda: 0) -> "ExtractorMetrics":
        r = CollectorRegistry()
        rid = str(replica_id)
        r.register(RoleProcessCollector("extractor", rid, restarts))
        m = cls(
            replica=rid,
            registry=r,
            images=Counter("loupe_extractor_images", "Images described by the replica (count).", ["replica"], registry=r),
            failures=Counter(
                "loupe_extractor_failures", "Extract calls that failed, by error (count).", ["replica", "reason"], registry=r,
            ),
            extract_seconds=Histogram(
                "loupe_extractor_extract_duration_seconds", "Seconds of one Extract call in the replica (queue wait included).",
                ["replica"], buckets=LATENCY_BUCKETS, registry=r,
            ),
            queue_wait_seconds=Histogram(
                "loupe_extractor_queue_wait_seconds", "Seconds an Extract call waited for the replica's model.",
                ["replica"], buckets=LATENCY_BUCKETS, registry=r,
            ),
            queue_depth=Gauge(
                "loupe_extractor_queue_depth", "Extract calls in the replica, waiting or running (count).", ["replica"], registry=r,
            ),
            queue_capacity=Gauge(
                "loupe_extractor_queue_capacity", "Extract calls the replica admits at once (worker threads; count).",
                ["replica"], registry=r,
            ),
        )
        m.queue_capacity.labels(rid).set(capacity)
        m.queue_depth.labels(rid)
        m.images.labels(rid)
        m.extract_seconds.labels(rid)
        m.queue_wait_seconds.labels(rid)
        return m
