"""Helpers shared by the benchmark scripts (not part of the library)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
ROXFORD = SHARED_DATA / "roxford5k_subset"


def machine() -> str:
    """One line describing this machine (CPU model, cores, Python, torch threads)."""
    cpu = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def require_roxford() -> Path:
    """The ROxford subset, or exit with a message when ../shared/data is absent."""
    if not (ROXFORD / "gnd_roxford5k_subset.pkl").exists():
        raise SystemExit(f"{ROXFORD} is absent: this benchmark needs ../shared/data (see its README)")
    return ROXFORD


def git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"
