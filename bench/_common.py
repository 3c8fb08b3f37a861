"""Helpers shared by the benchmark scripts (not part of the library)."""

from __future__ import annotations

import json
import os
import platform
import re
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

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


def landmark(name: str) -> str:
    """Landmark of a ROxford file name (``all_souls_000022`` → ``all_souls``)."""
    return re.sub(r"_\d+$", "", name)


def load_as_served(data: bytes, box: Sequence[float] | None, max_side: int) -> np.ndarray:
    """``(H, W, 3)`` uint8 image as the extractor prepares it: decoded, cropped to ``box``
    (a revisitop query's bbx, original pixels) when given, shrunk to ``max_side``."""
    from loupe.v1 import types_pb2
    from services.common.images import decode_image
    from services.extractor.describer import crop_and_resize

    img = decode_image(data, max_side=None if box else max_side)
    return crop_and_resize(img, types_pb2.Box(x1=box[0], y1=box[1], x2=box[2], y2=box[3]) if box else None, max_side)


def _parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def actor_pids(root: int, title: str) -> list[int]:
    """Processes descending from ``root`` whose command line contains ``title`` (Ray titles actor
    processes ``ray::ShardActor...``, ``ray::ExtractorActor...``)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if title.encode() not in (d / "cmdline").read_bytes():
                continue
            pid = int(d.name)
            while pid > 1 and pid != root:
                pid = _parent_pid(pid)
            if pid == root:
                pids.append(int(d.name))
        except (OSError, ValueError):
            continue
    return sorted(pids)


def rss_mib(pid: int) -> float:
    """Resident set size of ``pid`` in MiB (NaN once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class ShardProcess:
    """``python -m services.index`` serving one shard id on a directory (a real shard process:
    gRPC on 127.0.0.1, LMDB, faiss); ``pause``/``resume`` with SIGSTOP/SIGCONT, ``stop`` with SIGTERM."""

    def __init__(self, data_dir: str, shard_id: int = 0) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "services.index", "--data-dir", data_dir, "--shard-id", str(shard_id),
                                      "--snapshot-every", "1000000"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.address = json.loads(self.proc.stdout.readline())["address"]

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        self.resume()
        self.proc.terminate()
        self.proc.wait(60)
