#!/usr/bin/env python3
"""Render the Grafana dashboard's panels to a PNG from real Prometheus data (no Grafana needed).

    .venv/bin/python scripts/render_dashboard.py            # → docs/dashboard.png

starts a local loupe cluster and a Prometheus scraping it (scripts/ops_stack.py: the same stack
and workload as tests/ops/test_live_prometheus.py), then draws one small chart per panel, with its
title, from range queries of every panel target (variables substituted with the values present).
``--prometheus URL --start T0 --end T1`` renders from a Prometheus that already has the data.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

OUT = REPO / "docs" / "dashboard.png"
CHART_RATE_WINDOW = "10s"  # what $__rate_interval becomes in the charts (1 s scrapes)


def _legend(fmt: str, labels: dict) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt or "") or ",".join(f"{k}={v}" for k, v in labels.items())


def _formatter(unit: str):
    from matplotlib.ticker import FuncFormatter

    def fmt(v: float, _pos: int) -> str:
        if unit == "s":
            if v == 0:
                return "0"
            if abs(v) < 1e-3:
                return f"{v * 1e6:.3g} µs"
            return f"{v * 1000:.3g} ms" if abs(v) < 1 else f"{v:.3g} s"
        if unit == "bytes":
            for div, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
                if abs(v) >= div:
                    return f"{v / div:.1f} {name}"
            return f"{v:.0f} B"
        if unit == "percentunit":
            return f"{v * 100:.3g}%"
        if unit in ("reqps", "ops"):
            return f"{v:.2g}/s"
        return f"{v:.3g}"

    return FuncFormatter(fmt)


def render(prom, dashboard: dict, start: float, end: float, out: Path, variables: dict[str, str], step_s: float = 1.0) -> int:
    """Draw every panel of ``dashboard`` from ``prom`` over [start, end]; returns the panels drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dashboard_queries import substitute

    cols = 4
    sections: list[tuple[str, list[dict]]] = []
    for p in dashboard["panels"]:
        if p["type"] == "row":
            sections.append((p["title"], []))
        else:
            sections[-1][1].append(p)
    lines = sum((len(ps) + cols - 1) // cols for _, ps in sections)
    fig = plt.figure(figsize=(5 * cols, 3.1 * lines), constrained_layout=False)
    height = 3.1 * lines
    grid = fig.add_gridspec(lines, cols, hspace=0.75, wspace=0.3, top=1 - 0.7 / height, bottom=0.3 / height)
    line = 0
    for row, panels in sections:
        for i, p in enumerate(panels):
            ax = fig.add_subplot(grid[line + i // cols, i % cols])
            unit = p["fieldConfig"]["defaults"]["unit"]
            for t in p["targets"]:
                expr = substitute(t["expr"], variables, CHART_RATE_WINDOW)
                for series in prom.query_range(expr, start, end, step_s):
                    xs = [float(x) - start for x, _ in series["values"]]
                    ys = [float(y) for _, y in series["values"]]
                    ax.plot(xs, ys, linewidth=1.2, label=_legend(t.get("legendFormat", ""), series["metric"])[:28])
            ax.set_title(f"{row} · {p['title']}", fontsize=9, loc="left")
            ax.yaxis.set_major_formatter(_formatter(unit))
            ax.tick_params(labelsize=7)
            ax.set_xlim(0, end - start)
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=6, loc="upper left", ncol=2, frameon=False)
            else:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
        line += (len(panels) + cols - 1) // cols
    fig.suptitle(f"loupe dashboard — live Prometheus data, seconds since the workload started ({time.strftime('%Y-%m-%d', time.gmtime(end))})",
                 fontsize=12, y=1 - 0.2 / height)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=72, bbox_inches="tight")
    plt.close(fig)
    return sum(len(ps) for _, ps in sections)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(OUT), help=f"PNG to write (default {OUT.relative_to(REPO)})")
    ap.add_argument("--prometheus", default="", help="render from this Prometheus URL instead of starting a stack")
    ap.add_argument("--start", type=float, default=0.0, help="with --prometheus: start (Unix seconds; default end - 15 min)")
    ap.add_argument("--end", type=float, default=0.0, help="with --prometheus: end (Unix seconds; default now)")
    args = ap.parse_args(argv)

    from ops_stack import LocalPrometheus, dashboard, live_stack, variable_values

    dash = dashboard()
    if args.prometheus:
        prom = LocalPrometheus.__new__(LocalPrometheus)
        prom.url = args.prometheus.rstrip("/")
        end = args.end or time.time()
        n = render(prom, dash, args.start or end - 900, end, Path(args.out), variable_values(prom, dash))
    else:
        with tempfile.TemporaryDirectory(prefix="loupe-render-") as tmp, live_stack(Path(tmp)) as stack:
            w = stack.workload
            n = render(stack.prometheus, dash, w.start - 2, w.end, Path(args.out), variable_values(stack.prometheus, dash))
    print(f"wrote {args.out} ({n} panels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
