"""--shard-resource / --extractor-resource: CLI flag, LOUPE_* env, validation, local-cluster resources."""

from __future__ import annotations

import pytest

from cluster.cli import _cluster_config, build_parser
from cluster.config import ClusterConfig
from cluster.launcher import _local_resources


def test_flags_reach_the_config():
    args = build_parser().parse_args(["up", "--shard-resource", "loupe_shard", "--extractor-resource", "loupe_extractor", "--shards", "3"])
    cfg = _cluster_config(args)
    assert (cfg.shard_resource, cfg.extractor_resource) == ("loupe_shard", "loupe_extractor")


def test_defaults_ask_for_no_custom_resource():
    cfg = _cluster_config(build_parser().parse_args(["up"]))
    assert (cfg.shard_resource, cfg.extractor_resource) == ("", "")
    assert _local_resources(cfg) == {}


def test_environment_overrides():
    cfg = ClusterConfig.build({}, environ={"LOUPE_SHARD_RESOURCE": "s", "LOUPE_EXTRACTOR_RESOURCE": "e"})
    assert (cfg.shard_resource, cfg.extractor_resource) == ("s", "e")


@pytest.mark.parametrize("field", ["shard_resource", "extractor_resource"])
@pytest.mark.parametrize("bad", ["CPU", "GPU", "has space", '{"x": 1}', "a,b"])
def test_bad_resource_names_are_rejected_naming_the_setting(field, bad):
    with pytest.raises(ValueError, match=field):
        ClusterConfig(**{field: bad})


def test_a_local_cluster_advertises_what_its_actors_ask_for():
    cfg = ClusterConfig(shards=3, replicas=2, shard_resource="loupe_shard", extractor_resource="loupe_extractor")
    assert _local_resources(cfg) == {"loupe_shard": 3, "loupe_extractor": 2}


def test_one_resource_per_shard_replica_from_a_template():
    """``{shard}``/``{replica}`` in --shard-resource: a worker group (and volume) per shard replica."""
    cfg = ClusterConfig(shards=3, replicas=1, shard_resource="loupe_shard_{shard}_r{replica}")
    assert [cfg.shard_resource_of(i) for i in range(3)] == ["loupe_shard_0_r0", "loupe_shard_1_r0", "loupe_shard_2_r0"]
    assert _local_resources(cfg) == {"loupe_shard_0_r0": 1, "loupe_shard_1_r0": 1, "loupe_shard_2_r0": 1}
    with pytest.raises(ValueError, match="shard_resource"):
        ClusterConfig(shard_resource="loupe_{node}")
    with pytest.raises(ValueError, match="extractor_resource"):
        ClusterConfig(extractor_resource="loupe_{shard}")
