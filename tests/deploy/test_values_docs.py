"""values.yaml is documented for helm-docs: every value has a `# --` comment (on itself or on the
object that holds it), and every documented value exists in values.schema.json."""

from __future__ import annotations

import json
import re

import yaml
from chart_render import CHART_DIR

KEY = re.compile(r"^(\s*)([A-Za-z_][\w.-]*):(.*)$")


def _keys() -> list[tuple[str, bool, bool]]:
    """(dotted path, documented by a `# --` comment on it or an ancestor, is a leaf)."""
    out: list[tuple[str, bool, bool]] = []
    stack: list[tuple[int, str, bool]] = []  # (indent, key, documented)
    comment: list[str] = []
    for line in (CHART_DIR / "values.yaml").read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            comment.append(stripped)
            continue
        m = KEY.match(line)
        if not m or stripped.startswith("-"):
            comment = [] if not stripped else comment
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3).strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        documented = any(c.startswith("# --") for c in comment) or any(d for _, _, d in stack)
        path = ".".join([k for _, k, _ in stack] + [key])
        out.append((path, documented, bool(rest)))
        stack.append((indent, key, any(c.startswith("# --") for c in comment)))
        comment = []
    return out


def test_every_value_is_documented_for_helm_docs():
    keys = _keys()
    assert len(keys) > 40
    undocumented = [path for path, documented, leaf in keys if leaf and not documented]
    assert undocumented == []


def test_the_checker_sees_an_undocumented_value(tmp_path, monkeypatch):
    import chart_render

    chart = chart_render.chart_copy(tmp_path)
    (chart / "values.yaml").write_text((chart / "values.yaml").read_text() + "\nundocumented: 1\n")
    monkeypatch.setattr("test_values_docs.CHART_DIR", chart)
    assert ("undocumented", False, True) in _keys()


def test_every_value_is_declared_in_the_schema():
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())

    def walk(node, sch, path):
        assert sch.get("type") == "object", path
        for key, value in node.items():
            assert key in sch.get("properties", {}), f"values.schema.json: {path}{key} is not declared"
            sub = sch["properties"][key]
            if isinstance(value, dict) and sub.get("properties"):
                walk(value, sub, f"{path}{key}.")

    walk(values, schema, "")
