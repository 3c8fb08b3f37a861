"""PromQL helpers shared by the dashboard lint, the live Prometheus test and the PNG renderer."""

from __future__ import annotations

import re
from typing import Iterator, Mapping

# PromQL words that look like identifiers but are not metric names
_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values", "group",
    "inf", "nan",
}


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (label matchers, ranges, grouping lists and functions removed)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range / subquery windows
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)  # label lists
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        word = m.group(0)
        rest = s[m.end():].lstrip()
        if rest.startswith("(") or word.lower() in _KEYWORDS:
            continue  # a function or aggregation, or a keyword
        if m.start() > 0 and (s[m.start() - 1].isdigit() or s[m.start() - 1] == "."):
            continue  # part of a number such as 1e3
        names.add(word)
    return names


def panel_targets(dashboard: Mapping) -> Iterator[tuple[str, str, str]]:
    """(panel title, refId, expr) of every target of every non-row panel."""
    for p in dashboard["panels"]:
        if p.get("type") == "row":
            continue
        for t in p.get("targets", []):
            yield p["title"], t["refId"], t["expr"]


def substitute(expr: str, variables: Mapping[str, str], rate_interval: str) -> str:
    """Replace ``$__rate_interval`` and ``$name`` / ``${name}`` as Grafana would (regex values)."""
    out = expr.replace("$__rate_interval", rate_interval)
    for name in sorted(variables, key=len, reverse=True):
        out = out.replace("${" + name + "}", variables[name]).replace("$" + name, variables[name])
    return out


def regex_value(values: list[str]) -> str:
    """Grafana's regex formatting of a multi-value variable: ``(a|b)``, regex characters escaped
    (with the backslash doubled, as it goes inside a PromQL string); ``.*`` for none."""
    if not values:
        return ".*"
    escaped = [re.escape(v).replace("\\", "\\\\") for v in values]
    return "(" + "|".join(escaped) + ")" if len(escaped) > 1 else escaped[0]


def lint_dashboard(dashboard: Mapping, exported: set[str]) -> list[str]:
    """Problems of a dashboard: a panel without ``$datasource`` or a unit, a rate window other than
    ``$__rate_interval``, a metric no loupe role exports. Empty when it is clean."""
    problems = []
    for p in dashboard["panels"]:
        if p.get("type") == "row":
            continue
        title = p.get("title", "?")
        if (p.get("datasource") or {}).get("uid") != "$datasource":
            problems.append(f"{title}: panel datasource is not $datasource")
        if not p.get("fieldConfig", {}).get("defaults", {}).get("unit"):
            problems.append(f"{title}: no unit")
        if not p.get("targets"):
            problems.append(f"{title}: no targets")
        for t in p.get("targets", []):
            ref = t.get("refId", "?")
            if (t.get("datasource") or {}).get("uid") != "$datasource":
                problems.append(f"{title} {ref}: target datasource is not $datasource")
            for window in re.findall(r"\[([^\]]*)\]", t["expr"]):
                if window != "$__rate_interval":
                    problems.append(f"{title} {ref}: window [{window}] instead of [$__rate_interval]")
            for name in sorted(metric_names(t["expr"]) - exported):
                problems.append(f"{title} {ref}: metric {name} is not exported")
    return problems
