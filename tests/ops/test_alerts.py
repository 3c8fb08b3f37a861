"""The alert rules: valid for promtool, unit-tested with synthetic series, on exported metrics only."""

from __future__ import annotations

import subprocess

import yaml

from conftest import ALERT_NAMES, ALERT_TESTS, ALERTS, promtool
from dashboard_queries import metric_names



def _rules() -> list[dict]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def test_promtool_check_rules():
    out = subprocess.run([promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in out.stdout


def test_promtool_unit_tests_fire_and_stay_silent():
    out = subprocess.run([promtool(), "test", "rules", ALERT_TESTS.name], cwd=ALERT_TESTS.parent, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_every_alert_is_tested_firing_and_silent():
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    assert tests and yaml.safe_load(ALERT_TESTS.read_text())["rule_files"] == ["../../helm/loupe/files/alerts.yaml"]
    fired, silent = set(), set()
    for t in tests:
        for case in t["alert_rule_test"]:
            (fired if case["exp_alerts"] else silent).add(case["alertname"])
    assert fired == ALERT_NAMES, ALERT_NAMES - fired
    assert silent == ALERT_NAMES, ALERT_NAMES - silent


def test_alerts_name_severity_and_explain():
    rules = _rules()
    assert {r["alert"] for r in rules} == ALERT_NAMES
    for r in rules:
        assert r["labels"]["severity"] in ("warning", "critical"), r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]


def test_alerts_use_only_exported_metrics(exported):
    for r in _rules():
        assert metric_names(r["expr"]) <= exported, (r["alert"], metric_names(r["expr"]) - exported)


def test_shard_down_follows_the_brokers_health_check_not_scrape_targets():
    """Spare or deleted shard pods make ``up{role="shard"}`` meaningless (see shard_health.py)."""
    (rule,) = [r for r in _rules() if r["alert"] == "LoupeShardDown"]
    assert metric_names(rule["expr"]) == {"loupe_shard_up"}
