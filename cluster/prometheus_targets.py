"""The Prometheus file_sd targets file of a running cluster (``<data_dir>/prometheus-targets.json``).

``loupe up`` writes one target per ``/metrics`` exporter: the broker (``role="broker"``), each
shard replica's actor (``role="shard", shard="N", replica="J"``) and each extractor replica
(``role="extractor", replica="N"``), and rewrites the file when an actor comes back on another address. A Prometheus
on the head node scrapes the cluster with::

    scrape_configs:
      - job_name: loupe
        honor_labels: true
        file_sd_configs: [{files: [<data_dir>/prometheus-targets.json]}]

(``scrape_config`` below builds exactly that.) The metrics carry their own ``shard``/``replica``
labels, so ``honor_labels`` keeps them as they are instead of ``exported_shard`` duplicates.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from typing import Callable, Mapping

from services.space.placement import member_shard_replica

TARGETS_FILE = "prometheus-targets.json"

log = logging.getLogger(__name__)


def targets_path(data_dir: str) -> str:
    """Where the targets file of a cluster with ``data_dir`` lives ("" when there is no data dir)."""
    return os.path.join(data_dir, TARGETS_FILE) if data_dir else ""


def file_sd_targets(broker: str, members: Mapping[str, Mapping[int, str]]) -> list[dict]:
    """file_sd groups: the broker's ``host:port`` and every registered actor exporter.

    ``members`` maps a role ("shard", "extractor") to {member id: host:port}.
    """
    groups: list[dict] = [{"targets": [broker], "labels": {"role": "broker"}}] if broker else []
    for member_id, address in sorted(members.get("shard", {}).items()):
        shard, replica = member_shard_replica(member_id)
        groups.append({"targets": [address], "labels": {"role": "shard", "shard": str(shard), "replica": str(replica)}})
    for member_id, address in sorted(members.get("extractor", {}).items()):
        groups.append({"targets": [address], "labels": {"role": "extractor", "replica": str(member_id)}})
    return groups


def write_targets(path: str, groups: list[dict]) -> None:
    """Replace ``path`` atomically (Prometheus never reads a half-written file)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".prometheus-targets.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(groups, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def scrape_config(targets_file: str, interval_s: float = 15.0, job: str = "loupe") -> dict:
    """A Prometheus ``scrape_configs`` entry reading ``targets_file`` (see the module docstring)."""
    interval = f"{interval_s:g}s"
    return {
        "job_name": job,
        "honor_labels": True,
        "scrape_interval": interval,
        "scrape_timeout": interval,
        "file_sd_configs": [{"files": [os.path.abspath(targets_file)], "refresh_interval": "5s"}],
    }


class TargetsWriter:
    """Keeps a targets file current: re-reads the members every ``period_s`` and rewrites on change.

    ``members()`` returns {role: {id: host:port}} (the Ray registry's metrics snapshot).
    """

    def __init__(self, path: str, broker: str, members: Callable[[], Mapping[str, Mapping[int, str]]], period_s: float = 2.0) -> None:
        self.path, self.broker, self.members, self.period_s = path, broker, members, period_s
        self._written: list[dict] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> bool:
        """Rewrite the file if the members changed; returns whether it was written."""
        groups = file_sd_targets(self.broker, self.members())
        if groups == self._written:
            return False
        write_targets(self.path, groups)
        self._written = groups
        return True

    def start(self) -> "TargetsWriter":
        self.refresh()
        self._thread = threading.Thread(target=self._run, name="loupe-targets", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.refresh()
            except Exception as exc:  # the registry is briefly unreachable (Ray restarting): retry next period
                log.warning("targets file %s not refreshed: %s", self.path, exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
