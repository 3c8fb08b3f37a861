"""Query latency of rerank compositions, code trees side by side: ``loupe eval --skip-index`` on
one indexed collection, each tree in turn, several rounds, medians reported.

Each round runs every tree once (a fresh temporary cluster of that tree over the same stopped
``--data-dir``, all ``--rerank`` configurations in one eval), alternating so that the machine's
drift falls on every tree alike. Reported per tree and configuration: mAP (Easy / Medium / Hard,
which must not differ between rounds: the APs are deterministic), the median over rounds of the
query p50 and of each broker stage's p50 (ms), and the ratio of each configuration's p50 to the
same tree's ``none`` p50 in the same round (median over rounds).

    env GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=4294967296 \\
        .venv/bin/python bench/eval_rounds.py --data-dir D --tree before=/path/to/old/checkout --tree after=. \\
        --rerank none --rerank verify:100,diffuse-regional,diffuse-first,verify-global --rounds 3

A tree is a checkout with its own ``.venv`` (``make venv``), optionally with cluster flags (the
same tree under two settings: ``--tree base=. --tree q512=.:--query-local-max-side 512``); the data directory is one that a
``loupe eval``/``loupe up`` of a compatible store format wrote and left stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import machine, require_roxford  # noqa: E402


def eval_once(tree: str, data_dir: str, images: str, gnd: str, reranks: list[str], extra: list[str] = ()) -> dict:
    """One ``loupe eval --skip-index --json`` with ``tree``'s own environment (``extra``: more cluster flags)."""
    cmd = [os.path.join(tree, ".venv", "bin", "loupe"), "eval", "--images", images, "--gnd", gnd, "--skip-index",
           "--data-dir", data_dir, "--no-progress", "--json", *extra]
    for r in reranks:
        cmd += ["--rerank", r]
    out = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{tree}: loupe eval failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="an indexed, stopped collection (graphs built)")
    p.add_argument("--tree", action="append", required=True, metavar="LABEL=PATH[:FLAGS]",
                   help="a checkout with its .venv (repeatable); FLAGS after a colon are more `loupe eval` cluster flags, "
                        "e.g. 'q512=.:--query-local-max-side 512' (the same tree under two settings)")
    p.add_argument("--rerank", action="append", required=True, help="a configuration (repeatable); include 'none' for the ratios")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--images", default="")
    p.add_argument("--gnd", default="")
    args = p.parse_args(argv)
    rox = None if (args.images and args.gnd) else require_roxford()
    images = args.images or str(rox / "jpg")
    gnd = args.gnd or str(rox / "gnd_roxford5k_subset.pkl")
    trees = [(label, *(rest.split(":", 1) + [""])[:2]) for label, rest in (t.split("=", 1) for t in args.tree)]
    print(f"# {machine()}; {args.rounds} rounds; data {args.data_dir}")
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in trees}
    for r in range(args.rounds):
        for label, path, flags in trees:
            load = os.getloadavg()[0]
            t0 = time.time()
            runs[label].append(eval_once(os.path.abspath(path), args.data_dir, images, gnd, args.rerank, flags.split()))
            print(f"round {r + 1} {label}: {time.time() - t0:.0f} s, load average {load:.2f} -> {os.getloadavg()[0]:.2f}", flush=True)
    print()
    print("| tree | rerank | E / M / H mAP | p50 ms | stage p50s ms | p50 / none |")
    print("|---|---|---|---:|---|---:|")
    for label, _, _ in trees:
        for i, rerank in enumerate(args.rerank):
            per_round = [run["runs"][i] for run in runs[label]]
            maps = {tuple(round(x[s]["map"], 2) for s in ("easy", "medium", "hard")) for x in per_round}
            if len(maps) != 1:
                raise SystemExit(f"{label} {rerank}: mAP differs between rounds: {maps}")
            p50 = statistics.median(x["latency_ms"]["p50"] for x in per_round)
            stages = {k for x in per_round for k in x["stage_ms_p50"] if k != "total"}
            stage_txt = ", ".join(f"{k} {statistics.median(x['stage_ms_p50'].get(k, 0.0) for x in per_round):.0f}"
                                  for k in sorted(stages, key=lambda k: list(per_round[0]["stage_ms_p50"]).index(k)))
            ratio = ""
            if "none" in args.rerank:
                j = args.rerank.index("none")
                ratio = f"{statistics.median(x['runs'][i]['latency_ms']['p50'] / x['runs'][j]['latency_ms']['p50'] for x in runs[label]):.2f}x"
            e, m, h = maps.pop()
            print(f"| {label} | {rerank} | {e:.2f} / {m:.2f} / {h:.2f} | {p50:.0f} | {stage_txt} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
