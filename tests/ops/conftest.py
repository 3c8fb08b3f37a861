"""Fixtures of the operations tests: the scripts/ helpers on sys.path, what loupe exports."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

DASHBOARD = REPO / "helm" / "loupe" / "files" / "dashboard.json"
ALERTS = REPO / "helm" / "loupe" / "files" / "alerts.yaml"
# every alert of alerts.yaml, named once for the static and the live tests
ALERT_NAMES = {
    "LoupeShardDown", "LoupePartialAnswers", "LoupeErrorRatioHigh", "LoupeSearchLatencyHigh",
    "LoupeExtractorQueueSaturated", "LoupeStorageNearlyFull", "LoupeStorageFull", "LoupeActorRestarting", "LoupeExtractorReplicaDown",
    "LoupeShardUnderReplicated", "LoupeShardReplicaLagging",
}
ALERT_TESTS = Path(__file__).resolve().parent / "alerts_test.yaml"


def exported_metric_names() -> set[str]:
    """Every sample name the broker, a shard and an extractor replica export, plus Prometheus's ``up``."""
    from services.broker.metrics import BrokerMetrics
    from services.common.metrics import ExtractorMetrics, ShardMetrics, ShardState
    from metric_names import exported_names

    shard = ShardMetrics.create(0)
    shard.watch(lambda: ShardState(1, 5, 100, 1000, 4096, 512, 10**9, 10**10, 0.1, 0))
    return exported_names([BrokerMetrics.create().registry, shard.registry, ExtractorMetrics.create(0, 4).registry]) | {"up"}


@pytest.fixture(scope="session")
def exported() -> set[str]:
    return exported_metric_names()


def promtool() -> str:
    """Path of promtool, or skip (Debian package ``prometheus``; .ci/run installs it)."""
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is absent: install Debian's prometheus package (.ci/run does)")
    return path
