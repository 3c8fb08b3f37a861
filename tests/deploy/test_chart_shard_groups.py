"""`loupe.shardGroups`: the worker groups, claims and budgets a reshard grows into are provisioned
while the head keeps starting with the collection's `--shards` (README "Scaling the collection")."""

from __future__ import annotations

import pytest
import helm_process
from chart_render import RELEASE, one, render

if not helm_process.available():
    pytest.skip("helm-python-sdk (test extra) is not installed", allow_module_level=True)


def test_shard_groups_provision_more_shards_than_the_head_starts_with():
    objs = render({"loupe": {"shards": 2, "shardGroups": 3, "replicationFactor": 2}, "pdb": {"maxUnavailable": 1}})
    rc = one(objs, "RayCluster")
    groups = {g["groupName"] for g in rc["spec"]["workerGroupSpecs"]}
    assert {f"shard-{i}-r{j}" for i in range(3) for j in range(2)} <= groups and "shard-3-r0" not in groups
    pvcs = {o["metadata"]["name"] for o in objs if o["kind"] == "PersistentVolumeClaim"}
    assert {f"{RELEASE}-loupe-data-shard-2-r{j}" for j in range(2)} <= pvcs
    budgets = {o["metadata"]["name"] for o in objs if o["kind"] == "PodDisruptionBudget"}
    assert any(name.endswith("shard-2") for name in budgets)
    args = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--shards") + 1] == "2"  # the collection's count: the reshard changes it, not the groups


def test_shard_groups_below_the_shard_count_are_refused():
    with pytest.raises(helm_process.HelmError, match=r"loupe\.shardGroups = 2 is less than loupe\.shards = 3"):
        render({"loupe": {"shards": 3, "shardGroups": 2}})


def test_helm_runs_outside_the_pytest_process():
    """Helm's Go runtime never loads into a pytest process (tests/helm_process.py says why)."""
    import sys

    assert render({}) and "helm_python" not in sys.modules
