"""How many CPUs this process may really use: the container's CPU limit, not the host's cores.

In a Kubernetes pod ``os.cpu_count()`` is the node's core count (64 on a 64-core node) while
the pod may be limited to 4 CPUs by its cgroup quota; threads sized from the former
oversubscribe the latter. Every actor sizes its own threads here, inside its own pod.
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def cgroup_cpu_limit(root: str | Path = "/sys/fs/cgroup") -> float | None:
    """CPUs allowed by the cgroup CPU quota (v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``), None if unlimited."""
    root = Path(root)
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]  # cgroup v2: "max 100000" or "400000 100000"
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for v1 in (root / "cpu", root / "cpu,cpuacct", root):
        try:
            quota_us = int((v1 / "cpu.cfs_quota_us").read_text())
            period_us = int((v1 / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    return None


def available_cpus(root: str | Path = "/sys/fs/cgroup") -> int:
    """Whole CPUs this process may use: the smaller of its CPU affinity and its cgroup quota
    (rounded up: a 2.5-CPU limit runs 3 threads), at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)


def threads_per_member(explicit: int, members_here: int, root: str | Path = "/sys/fs/cgroup") -> int:
    """``explicit`` threads, or (0) this process's CPUs shared by the ``members_here`` members
    (shards or extractor replicas) of its node/pod."""
    return explicit or max(1, available_cpus(root) // max(1, members_here))
