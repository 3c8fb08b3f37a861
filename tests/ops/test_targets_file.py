"""The Prometheus file_sd targets file (pure logic; the live test reads a real cluster's file)."""

from __future__ import annotations

import json

from cluster.prometheus_targets import TargetsWriter, file_sd_targets, scrape_config, targets_path
from services.space.placement import shard_member


def test_targets_name_every_exporter_with_role_and_member_labels():
    members = {"shard": {1: "10.0.0.3:9091", 0: "10.0.0.2:9091", shard_member(0, 1): "10.0.0.5:9091"}, "extractor": {0: "10.0.0.4:9092"}}
    groups = file_sd_targets("10.0.0.1:9090", members)
    assert groups == [
        {"targets": ["10.0.0.1:9090"], "labels": {"role": "broker"}},
        {"targets": ["10.0.0.2:9091"], "labels": {"role": "shard", "shard": "0", "replica": "0"}},
        {"targets": ["10.0.0.3:9091"], "labels": {"role": "shard", "shard": "1", "replica": "0"}},
        {"targets": ["10.0.0.5:9091"], "labels": {"role": "shard", "shard": "0", "replica": "1"}},
        {"targets": ["10.0.0.4:9092"], "labels": {"role": "extractor", "replica": "0"}},
    ]


def test_writer_rewrites_the_file_only_when_an_actor_moves(tmp_path):
    members = {"shard": {0: "127.0.0.1:1001"}, "extractor": {0: "127.0.0.1:2001"}}
    path = targets_path(str(tmp_path))
    assert path == str(tmp_path / "prometheus-targets.json") and targets_path("") == ""
    w = TargetsWriter(path, "127.0.0.1:9090", lambda: members)
    assert w.refresh() is True
    assert json.loads(open(path).read())[1]["targets"] == ["127.0.0.1:1001"]
    assert w.refresh() is False  # unchanged
    members["shard"][0] = "127.0.0.1:1002"  # restarted on another port
    assert w.refresh() is True
    assert json.loads(open(path).read())[1]["targets"] == ["127.0.0.1:1002"]
    assert [p.name for p in tmp_path.iterdir()] == ["prometheus-targets.json"]  # no temporary left


def test_scrape_config_reads_the_file_and_honors_the_metrics_labels(tmp_path):
    cfg = scrape_config(str(tmp_path / "t.json"), 1.0)
    assert cfg["honor_labels"] is True and cfg["scrape_interval"] == "1s"
    assert cfg["file_sd_configs"][0]["files"] == [str(tmp_path / "t.json")]


def test_metrics_port_flags_reach_the_config():
    import pytest

    from cluster.cli import build_parser
    from cluster.config import ClusterConfig

    args = build_parser().parse_args(["up", "--shard-metrics-port", "9091", "--extractor-metrics-port", "9092"])
    assert (args.shard_metrics_port, args.extractor_metrics_port) == (9091, 9092)
    cfg = ClusterConfig.build({}, {"LOUPE_SHARD_METRICS_PORT": "9091", "LOUPE_EXTRACTOR_METRICS_PORT": "9092"})
    assert (cfg.shard_metrics_port, cfg.extractor_metrics_port) == (9091, 9092)
    assert ClusterConfig().shard_metrics_port == ClusterConfig().extractor_metrics_port == 0
    with pytest.raises(ValueError, match="shard_metrics_port"):
        ClusterConfig(shard_metrics_port=70000)
    with pytest.raises(ValueError, match="LOUPE_EXTRACTOR_METRICS_PORT"):
        ClusterConfig.build({}, {"LOUPE_EXTRACTOR_METRICS_PORT": "x"})
