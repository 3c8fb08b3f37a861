"""Thread counts from the container's CPU limit (cgroup v1 and v2 files), not the host's cores."""

from __future__ import annotations

import os

from cluster.cpus import available_cpus, cgroup_cpu_limit, threads_per_member


def test_cgroup_v2_quota(tmp_path) -> None:
    (tmp_path / "cpu.max").write_text("400000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 4.0
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None


def test_cgroup_v1_quota(tmp_path) -> None:
    d = tmp_path / "cpu"
    d.mkdir()
    (d / "cpu.cfs_quota_us").write_text("250000\n")
    (d / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path) == 2.5
    (d / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(tmp_path) is None


def test_threads_follow_the_limit_not_the_host(tmp_path) -> None:
    (tmp_path / "cpu.max").write_text("100000 100000\n")  # a 1-CPU pod
    assert available_cpus(tmp_path) == 1
    assert threads_per_member(0, 2, tmp_path) == 1  # never 0
    assert threads_per_member(3, 2, tmp_path) == 3  # an explicit setting wins
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cpus(tmp_path) == len(os.sched_getaffinity(0))
    assert cgroup_cpu_limit(tmp_path / "missing") is None
