"""The Grafana dashboard: generated, committed up to date, and clean (datasource, units, windows, metrics)."""

from __future__ import annotations

import copy
import json

from conftest import DASHBOARD
from dashboard_queries import lint_dashboard, metric_names, panel_targets
from gen_dashboard import build_dashboard, render_json

ROWS = ["Traffic", "Admission", "Latency", "Rerank", "Shards", "Replication", "Extractors", "Storage", "Resources"]


def test_committed_dashboard_is_the_generated_one():
    assert DASHBOARD.read_text() == render_json(), "run .venv/bin/python scripts/gen_dashboard.py"


def test_dashboard_lints_clean(exported):
    dashboard = json.loads(DASHBOARD.read_text())
    assert lint_dashboard(dashboard, exported) == []
    n = sum(1 for _ in panel_targets(dashboard))
    assert n >= 30


def test_lint_reports_each_kind_of_problem(exported):
    d = copy.deepcopy(build_dashboard())
    victim = next(p for p in d["panels"] if p["type"] != "row")
    victim["datasource"] = {"type": "prometheus", "uid": "prom-1"}
    victim["fieldConfig"]["defaults"].pop("unit")
    victim["targets"][0]["expr"] = "rate(loupe_no_such_metric_total[5m])"
    problems = lint_dashboard(d, exported)
    assert any("datasource" in p for p in problems)
    assert any("no unit" in p for p in problems)
    assert any("[5m]" in p for p in problems)
    assert any("loupe_no_such_metric_total" in p for p in problems)


def test_rows_and_variables():
    d = build_dashboard()
    assert [p["title"] for p in d["panels"] if p["type"] == "row"] == ROWS
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert set(variables) == {"datasource", "namespace", "instance", "shard"}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))


def test_every_role_is_on_the_dashboard():
    names = set().union(*(metric_names(e) for _, _, e in panel_targets(build_dashboard())))
    assert any(n.startswith("loupe_shard_") for n in names)
    assert any(n.startswith("loupe_extractor_") for n in names)
    assert {"loupe_requests_total", "loupe_stage_duration_seconds_bucket", "loupe_process_cpu_seconds_total",
            "loupe_process_resident_memory_bytes", "loupe_actor_restarts", "loupe_shard_commit_duration_seconds_bucket"} <= names


def test_metric_names_of_promql():
    assert metric_names('histogram_quantile(0.99, sum by (le, shard) (rate(a_bucket{x="y(z)"}[5m]))) > 2.5e3') == {"a_bucket"}
    assert metric_names("max_over_time(b[30m]) - min_over_time(b[30m]) >= 3 and on (job) up == 1") == {"b", "up"}


def test_shard_health_panel_reads_the_brokers_gauge():
    panels = {p["title"]: p for p in build_dashboard()["panels"] if p["type"] != "row"}
    health = panels["Shard health (1 = up)"]
    assert set().union(*(metric_names(t["expr"]) for t in health["targets"])) == {"loupe_shard_up"}
