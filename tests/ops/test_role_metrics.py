"""Role metrics in-process: units in names, help strings, the shard and extractor hooks."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import generate_latest

from conftest import exported_metric_names
from services.common.metrics import ExtractorMetrics, RoleProcessCollector, ShardMetrics
from services.index.shard_index import ShardIndex
from services.index.store import ShardStore, StoredImage

UNITLESS_OK = ("_total", "_bytes", "_seconds", "_bucket", "_count", "_sum", "_created")


def test_every_metric_has_help_and_a_unit_or_count_suffix():
    from services.broker.metrics import BrokerMetrics

    counts = {"loupe_shard_images", "loupe_shard_regional_vectors", "loupe_shard_local_features", "loupe_shard_startup_replayed_changes",
              "loupe_extractor_queue_depth", "loupe_extractor_queue_capacity", "loupe_inflight_requests", "loupe_shard_vectors", "loupe_shard_up", "loupe_extractor_up",
              "loupe_graph_images", "loupe_actor_restarts", "loupe_process_open_fds", "loupe_shard_replica_up", "loupe_shard_replica_in_sync",
              "loupe_shard_replica_lag_writes", "loupe_shard_replica_catch_up_ratio", "loupe_shard_replicas_in_sync",
              "loupe_shard_replication_factor", "loupe_admission_in_use", "loupe_admission_waiting", "loupe_admission_capacity",
              "loupe_admission_max_waiting"}
    for registry in (BrokerMetrics.create().registry, ShardMetrics.create(0).registry, ExtractorMetrics.create(0, 4).registry):
        for family in registry.collect():
            assert family.documentation, family.name
            if family.type in ("histogram", "counter"):
                continue
            assert family.name.endswith(UNITLESS_OK) or family.name in counts, family.name


def test_process_metrics_carry_role_and_member():
    text = generate_latest(ShardMetrics.create(3, restarts=lambda: 2).registry).decode()
    assert 'loupe_process_resident_memory_bytes{member="3",role="shard"}' in text
    assert 'loupe_process_cpu_seconds_total{member="3",role="shard"}' in text
    assert 'loupe_actor_restarts{member="3",role="shard"} 2.0' in text
    with pytest.raises(ValueError, match="role"):
        RoleProcessCollector("gateway", "0")


def test_shard_metrics_follow_writes_commits_and_holdings(tmp_path):
    from services.common.metrics import shard_state

    m = ShardMetrics.create(0)
    store = ShardStore(str(tmp_path))
    store.on_commit = m.commit_seconds.labels("0").observe
    index = ShardIndex(store, background=False)
    m.watch(lambda: shard_state(index))
    rng = np.random.default_rng(0)
    index.add([StoredImage(f"img{i}", rng.standard_normal(8).astype(np.float32), None, None) for i in range(3)])
    text = generate_latest(m.registry).decode()
    assert 'loupe_shard_images{shard="0"} 3.0' in text
    commits = m.commit_seconds.labels("0")._sum.get()
    assert commits > 0
    assert 'loupe_shard_disk_capacity_bytes{shard="0"}' in text and 'loupe_shard_storage_bytes{shard="0"}' in text
    index.close()


def test_conftest_names_cover_the_three_roles():
    names = exported_metric_names()
    assert {"loupe_requests_total", "loupe_shard_images", "loupe_extractor_images_total", "up"} <= names


def test_a_taken_fixed_metrics_port_falls_back_to_a_free_one():
    from urllib.request import urlopen

    from prometheus_client import CollectorRegistry

    from services.common.metrics import serve_metrics

    first = serve_metrics(ExtractorMetrics.create(0, 4).registry, "127.0.0.1", 0)
    try:
        second = serve_metrics(CollectorRegistry(), "127.0.0.1", first.port)
        try:
            assert second.port not in (0, first.port)
            body = urlopen(f"http://127.0.0.1:{first.port}/metrics", timeout=5).read().decode()
            assert 'loupe_extractor_queue_capacity{replica="0"} 4.0' in body
        finally:
            second.close()
    finally:
        first.close()
