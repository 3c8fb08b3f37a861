"""Proof on real parts: a loupe cluster, a real Prometheus scraping it through the cluster's file_sd
targets file (1 s scrapes, alert rules loaded), a short workload; then every target expression of
every dashboard panel is evaluated through Prometheus's HTTP API and must return data."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time

import pytest

from conftest import ALERT_NAMES, ALERTS, promtool
from dashboard_queries import metric_names, panel_targets, substitute

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus is absent: install Debian's prometheus package (.ci/run does)")
    from ops_stack import live_stack

    with live_stack(tmp_path_factory.mktemp("ops")) as s:
        yield s


def _window(stack) -> str:
    """``$__rate_interval`` for an evaluation at the end of the workload: the workload's span."""
    return f"{math.ceil(stack.workload.end - stack.workload.start) + 5}s"


def test_every_panel_expression_returns_data(stack):
    from ops_stack import dashboard, variable_values

    dash = dashboard()
    variables = variable_values(stack.prometheus, dash)
    assert variables["shard"] != ".*" and variables["instance"] != ".*"  # values present were substituted
    empty, finite, total = [], 0, 0
    for title, ref, expr in panel_targets(dash):
        total += 1
        result = stack.prometheus.query(substitute(expr, variables, _window(stack)), at=stack.workload.end)
        if not result:
            empty.append(f"{title} {ref}: {expr}")
        finite += any(math.isfinite(float(r["value"][1])) for r in result)
    print(f"\n{total - len(empty)}/{total} panel expressions returned data ({finite} with a finite value); workload {stack.workload.counts}")
    assert not empty, "\n".join(empty)
    assert finite >= total - 2, f"only {finite} of {total} expressions had a finite value"


def test_every_queried_metric_is_in_prometheus(stack):
    from ops_stack import dashboard

    present = set(stack.prometheus.label_values("__name__"))
    wanted = set().union(*(metric_names(e) for _, _, e in panel_targets(dashboard())))
    assert wanted <= present, sorted(wanted - present)


def test_alert_rules_load_and_evaluate_on_real_series(stack):
    out = subprocess.run([promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    groups = stack.prometheus.api("rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert {r["name"] for r in rules} == ALERT_NAMES
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    present = set(stack.prometheus.label_values("__name__"))
    for r in rules:
        assert metric_names(r["query"]) <= present, (r["name"], metric_names(r["query"]) - present)


def test_targets_file_names_every_exporter(stack):
    groups = json.loads(open(stack.cluster.targets_file).read())
    roles = sorted((g["labels"]["role"], g["labels"].get("shard", g["labels"].get("replica", ""))) for g in groups)
    assert roles == [("broker", ""), ("extractor", "0"), ("shard", "0"), ("shard", "1")]
    health = {(t["labels"]["role"], t["labels"].get("shard", "")): t["health"] for t in stack.prometheus.api("targets")["activeTargets"]}
    assert health[("broker", "")] == "up" and health[("shard", "0")] == "up"
    assert health[("shard", "1")] == "down"  # killed by the workload


def _eventually(stack, expr: str, timeout_s: float = 30.0) -> list[dict]:
    """The latest result of ``expr``, polled until it is non-empty or ``timeout_s`` passes (a bound, not a timing assertion)."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = stack.prometheus.query(expr)
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.5)


def test_workload_left_its_marks(stack):
    end = stack.workload.end
    q = stack.prometheus.query
    assert float(q('loupe_actor_restarts{role="shard", member="0"}', end)[0]["value"][1]) == 1  # Ray restarted it once
    assert float(q("loupe_partial_responses_total", end)[0]["value"][1]) >= stack.workload.counts["partial"] >= 1
    assert float(q('sum(loupe_shard_failures_total{shard="1"})', end)[0]["value"][1]) >= 1
    assert q('up{role="shard", shard="1"} == 0', end)
    # the broker's own health check: shard 1 (killed) down, shard 0 (restarted by Ray) up
    assert _eventually(stack, 'loupe_shard_up{shard="1"} == 0'), "the broker never marked the killed shard 1 down"
    assert _eventually(stack, 'loupe_shard_up{shard="0"} == 1'), "the broker does not see the restarted shard 0 up"
    # the shards' counters restart with their process: the most each one reached
    assert float(q(f'sum(max_over_time(loupe_shard_writes_total{{op="delete"}}[{_window(stack)}]))', end)[0]["value"][1]) == 1
    assert float(q(f'sum(max_over_time(loupe_shard_writes_total{{op="add"}}[{_window(stack)}]))', end)[0]["value"][1]) == 8


def test_dashboard_renders_to_png(stack, tmp_path):
    from ops_stack import dashboard, variable_values
    from render_dashboard import render

    out = tmp_path / "dashboard.png"
    w = stack.workload
    n = render(stack.prometheus, dashboard(), w.start - 2, w.end, out, variable_values(stack.prometheus, dashboard()))
    assert n == sum(1 for p in dashboard()["panels"] if p["type"] != "row")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
