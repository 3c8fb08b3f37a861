"""A live observability stack on loopback: a loupe cluster, a real Prometheus scraping it through
the cluster's file_sd targets file, and a short bounded workload.

Used by tests/ops/test_live_prometheus.py (every dashboard query must return data) and by
scripts/render_dashboard.py (docs/dashboard.png). Nothing here talks beyond 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

REPO = Path(__file__).resolve().parents[1]
ALERTS = REPO / "helm" / "loupe" / "files" / "alerts.yaml"
DASHBOARD = REPO / "helm" / "loupe" / "files" / "dashboard.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalPrometheus:
    """A ``prometheus`` process on 127.0.0.1 scraping ``targets_file`` every ``interval_s`` seconds,
    with ``rule_files`` loaded and evaluated at the same interval. Use as a context manager."""

    def __init__(self, workdir: Path, targets_file: str, rule_files: list[str] = (), interval_s: float = 1.0, binary: str = "prometheus") -> None:
        from cluster.prometheus_targets import scrape_config

        self.workdir = Path(workdir)
        self.binary = shutil.which(binary) or binary
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = {
            "global": {"scrape_interval": f"{interval_s:g}s", "evaluation_interval": f"{interval_s:g}s"},
            "rule_files": [str(Path(f).resolve()) for f in rule_files],
            "scrape_configs": [scrape_config(targets_file, interval_s)],
        }
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "LocalPrometheus":
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "prometheus.yml"
        cfg.write_text(yaml.safe_dump(self.config))
        self.log = open(self.workdir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={cfg}", f"--storage.tsdb.path={self.workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn", "--storage.tsdb.retention.time=1d"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}: {(self.workdir / 'prometheus.log').read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(f"{self.url}/-/ready", timeout=2).status == 200:
                    return self
            time.sleep(0.2)
        self.__exit__(None, None, None)
        raise TimeoutError("prometheus did not become ready in 60 s")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
            self.log.close()

    def api(self, path: str, **params: Any) -> Any:
        """GET ``/api/v1/<path>``; returns ``data`` or raises with Prometheus's error."""
        url = f"{self.url}/api/v1/{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
        try:
            body = json.loads(urllib.request.urlopen(url, timeout=30).read())
        except urllib.error.HTTPError as err:
            body = json.loads(err.read())
        if body.get("status") != "success":
            raise ValueError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr} | ({"time": f"{at:.3f}"} if at is not None else {})
        return self.api("query", **params)["result"]

    def query_range(self, expr: str, start: float, end: float, step_s: float = 1.0) -> list[dict]:
        return self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step_s:g}")["result"]

    def label_values(self, label: str) -> list[str]:
        return self.api(f"label/{label}/values")

    def wait_scrapes(self, n: int = 3, timeout_s: float = 30.0) -> None:
        """Wait until every active target has been scraped ``n`` more times (or timeout)."""
        start = time.time()
        interval = float(self.config["global"]["scrape_interval"].rstrip("s"))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            targets = self.api("targets")["activeTargets"]
            if targets and all(_ts(t["lastScrape"]) > start + (n - 1) * interval for t in targets):
                return
            time.sleep(interval / 2)


def _ts(rfc3339: str) -> float:
    """Seconds since the epoch of Prometheus's RFC 3339 timestamps (nanoseconds, Z or offset)."""
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$", rfc3339)
    if m is None or rfc3339.startswith("0001"):
        return 0.0  # never scraped
    zone = "+00:00" if m.group(3) == "Z" else m.group(3)
    return datetime.fromisoformat(m.group(1) + zone).timestamp() + float(m.group(2) or 0)


@dataclass
class Workload:
    """What ``drive_workload`` did, and when."""

    start: float = 0.0
    end: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)

    def bump(self, what: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n


def drive_workload(
    cluster: Any, client: Any, *, photos: int = 4, restart_shard: int | None = 0, kill_shard: int | None = 1,
    settle: Callable[[], None] = lambda: None,
) -> Workload:
    """A short, bounded workload touching every panel: index, build the graph, search with each
    rerank stage, bad requests, a delete, stats, a shard restart (Ray brings it back), a killed
    shard (partial answers). ``settle()`` runs before a shard goes down, so that a scrape
    records what the dying process counted."""
    import grpc

    from cluster.demo import HELD_OUT, INDEXED, PHOTOS, encode_jpeg, load_photo
    from loupe.client import ImageToAdd
    from loupe.rerank_spec import parse_rerank

    w = Workload(start=time.time())
    names = PHOTOS[:photos]
    transforms = list(INDEXED.items())[:2]
    db = [ImageToAdd(f"{p}/{t}", encode_jpeg(fn(load_photo(p))), {"photo": p}) for p in names for t, fn in transforms]
    w.bump("added", client.add_images(db, batch_size=4).added)
    client.build_graph()
    queries = [encode_jpeg(HELD_OUT["perspective"](load_photo(p))) for p in names[:2]]

    def searches(specs: list[str]) -> None:
        for spec in specs:
            for q in queries:
                resp = client.search(image=q, k=3, rerank=parse_rerank(spec) if spec else None)
                w.bump("searches")
                w.bump("partial", int(resp.partial))

    def bad_requests() -> None:
        for bad in ({"image": b"not an image", "k": 3}, {"image": queries[0], "k": 0}):
            with contextlib.suppress(grpc.RpcError):
                client.search(**bad)
            w.bump("bad_requests")

    bad_requests()  # twice, a scrape apart: a counter's first sample is not an increase to rate()
    settle()
    searches(["", "verify", "diffuse", "qe", "dba", "diffuse-regional", "verify,diffuse-regional,diffuse-first"])
    bad_requests()
    client.delete([db[0].image_id])
    w.bump("deleted")
    client.stats()
    if restart_shard is not None:
        settle()
        cluster.restart_shard(restart_shard)
        w.bump("restarts")
        searches(["", "verify"])
    if kill_shard is not None:
        settle()
        cluster.kill_shard(kill_shard)
        w.bump("killed")
        searches(["", "verify"])
    w.end = time.time()
    return w


@dataclass
class LiveStack:
    """A running cluster + Prometheus after the workload."""

    cluster: Any
    prometheus: LocalPrometheus
    workload: Workload


@contextlib.contextmanager
def live_stack(workdir: Path, *, interval_s: float = 1.0) -> Iterator[LiveStack]:
    """Start a 2-shard, 1-replica loupe cluster with ``workdir/data`` as data dir (small images for
    speed), a Prometheus scraping it through the targets file with the alert rules loaded, run
    the workload and wait for the last scrapes."""
    from cluster.config import ClusterConfig
    from cluster.launcher import Cluster
    from loupe.client import RetrievalClient
    from services.broker.config import BrokerConfig

    workdir = Path(workdir)
    cfg = ClusterConfig(
        shards=2, replicas=1, max_side=256, global_max_side=256, scales=(1.0,), data_dir=str(workdir / "data"), extractor_threads=1,
    )
    # the broker's shard health check as often as Prometheus scrapes (default every 5 s)
    with Cluster(cfg, BrokerConfig(shard_health_period_s=interval_s)) as cluster:
        with LocalPrometheus(workdir / "prometheus", cluster.targets_file, [str(ALERTS)], interval_s) as prom:
            with RetrievalClient(cluster.broker_address) as client:
                client.wait_ready(30)
                prom.wait_scrapes(1)
                workload = drive_workload(cluster, client, settle=lambda: prom.wait_scrapes(2))
            prom.wait_scrapes(3)
            workload.end = time.time()
            yield LiveStack(cluster, prom, workload)


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def variable_values(prom: LocalPrometheus, dash: dict) -> dict[str, str]:
    """Each query variable as Grafana would substitute "All of the values present" (``.*`` when none)."""
    from dashboard_queries import regex_value

    out = {"datasource": "prometheus"}
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            out[v["name"]] = regex_value(prom.label_values(v["name"]))
    return out
