"""``loupe up`` on a data directory written for another shard count refuses, naming the setting.

The head checks ``<data-dir>/layout.json`` before anything starts; each shard checks its own
directory (its own volume on Kubernetes) — here a shard directory handed to another shard id.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cluster.config import ClusterConfig
from cluster.launcher import Cluster
from services.space.layout import Layout, check_layout

pytestmark = pytest.mark.usefixtures("local_ray")  # one Ray for the whole run (tests/conftest.py)

LOUPE = str(Path(sys.executable).parent / "loupe")


def test_loupe_up_refuses_another_shard_count(tmp_path: Path) -> None:
    check_layout(tmp_path, Layout(shards=2))
    proc = subprocess.run([LOUPE, "up", "--data-dir", str(tmp_path), "--shards", "3", "--port", "0", "--metrics-port", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "shards=2" in proc.stderr and "--shards 3" in proc.stderr and "Start with --shards 2" in proc.stderr, proc.stderr[-2000:]


def test_a_shard_refuses_a_directory_written_for_another_shard(tmp_path: Path) -> None:
    """The root layout matches, but shard-000 holds shard 1's data (a volume mixed up)."""
    check_layout(tmp_path, Layout(shards=2))
    check_layout(tmp_path / "shard-000", Layout(shards=2, shard=1, replica=0))
    cfg = ClusterConfig(shards=2, replicas=1, max_side=128, global_max_side=128, scales=(1.0,), data_dir=str(tmp_path), startup_timeout_s=120)
    with pytest.raises(Exception, match="holds shard 1 but was given to shard 0"):
        Cluster(cfg).start()
