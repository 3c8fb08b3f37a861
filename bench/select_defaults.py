"""Choosing defaults without overfitting the 9 known ROxford-subset queries.

Two steps, so the expensive part (indexing through a real cluster) is done once per extraction
setting and every analysis reads the saved ``loupe eval --json`` outputs:

``make-set``
    Writes the confirmation set (``services.eval.heldout``): a reduced database (the held-out
    photos removed) whose ground truth lists the 9 known queries, then the held-out queries
    made from database photos of the landmarks with >= 10 positives; plus ``split.json``
    (which query is known / held-out, and each query's landmark).

``report``
    Reads eval outputs (one per extraction setting; each holds several rerank
    configurations), prints per-query Medium/Hard AP for every configuration, means over the
    known and the held-out queries (and over landmarks), the leave-one-landmark-out choice on
    the known queries, and applies the decision rule: a candidate replaces the baseline only
    if it is better on the held-out Medium or Hard mean by more than ``--margin`` points *and*
    not worse by more than ``--margin`` on either held-out mean, on any landmark's held-out
    Medium mean, nor on the known Medium/Hard means (a difference within the margin is noise
    at 9 + 12 queries: one query moving 20 points moves a mean by ~2).

    .venv/bin/python bench/select_defaults.py make-set --out /tmp/loupe-sel
    loupe eval --images ../shared/data/roxford5k_subset/jpg --gnd /tmp/loupe-sel/gnd.json \
        --rerank none --rerank verify,diffuse-regional ... --json > /tmp/loupe-sel/A.json
    .venv/bin/python bench/select_defaults.py report --split /tmp/loupe-sel/split.json \
        --baseline 'A:verify,diffuse-regional,diffuse-first' A=/tmp/loupe-sel/A.json B=...
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import require_roxford  # noqa: E402
from services.eval.ground_truth import load_ground_truth  # noqa: E402
from bench.heldout import heldout_split, to_json  # noqa: E402


def make_set(out: str) -> None:
    from PIL import Image

    root = require_roxford()
    gt = load_ground_truth(root / "gnd_roxford5k_subset.pkl")

    def size(name: str) -> tuple[int, int]:
        with Image.open(root / "jpg" / f"{name}.jpg") as im:
            return im.size

    split = heldout_split(gt, size)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "gnd.json"), "w") as f:
        json.dump(to_json(split.gt), f)
    with open(os.path.join(out, "split.json"), "w") as f:
        json.dump({"known": split.known, "heldout": split.heldout, "landmark": split.landmark}, f, indent=1)
    print(f"database {len(split.gt.imlist)} images (held out {len(split.heldout)}), "
          f"{len(split.known)} known + {len(split.heldout)} held-out queries -> {out}/gnd.json, {out}/split.json")


def _mean(values: list[float | None]) -> float:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else float("nan")


def load_runs(specs: list[str]) -> dict[str, dict[str, dict[str, float | None]]]:
    """``NAME=eval.json`` → ``{"NAME:rerank": {query: {"medium": ap, "hard": ap}}}``."""
    out = {}
    for spec in specs:
        label, _, path = spec.partition("=")
        with open(path) as f:
            result = json.load(f)
        for run in result["runs"]:
            out[f"{label}:{run['rerank']}"] = {q["name"]: q["ap"] for q in run["queries"]}
    return out


def summarise(aps: dict[str, dict], split: dict) -> dict[str, float]:
    """Means of one configuration: known/held-out × Medium/Hard, and held-out per landmark."""
    s = {}
    for part in ("known", "heldout"):
        for p in ("medium", "hard"):
            s[f"{part}.{p}"] = _mean([aps[q][p] for q in split[part]])
    for lm in sorted({split["landmark"][q] for q in split["heldout"]}):
        s[f"heldout.{lm}"] = _mean([aps[q]["medium"] for q in split["heldout"] if split["landmark"][q] == lm])
    s["heldout.landmark_mean"] = _mean([v for k, v in s.items() if k.startswith("heldout.") and k.count(".") == 1
                                        and k.split(".")[1] not in ("medium", "hard")])
    return s


def leave_one_landmark_out(runs: dict[str, dict], split: dict) -> list[dict]:
    """For each known landmark: the configuration with the best known-query Medium mean on the
    other landmarks, and its Medium mean on the left-out landmark (vs the best possible there)."""
    rows = []
    known = split["known"]
    for lm in sorted({split["landmark"][q] for q in known}):
        train = [q for q in known if split["landmark"][q] != lm]
        test = [q for q in known if split["landmark"][q] == lm]
        if all(all(runs[c][q]["medium"] is None for q in test) for c in runs):
            continue
        pick = max(runs, key=lambda c: _mean([runs[c][q]["medium"] for q in train]))
        oracle = max(runs, key=lambda c: _mean([runs[c][q]["medium"] for q in test]))
        rows.append({"left_out": lm, "picked": pick, "picked_ap": _mean([runs[pick][q]["medium"] for q in test]),
                     "oracle": oracle, "oracle_ap": _mean([runs[oracle][q]["medium"] for q in test])})
    return rows


def decide(runs: dict[str, dict], split: dict, baseline: str, margin: float) -> list[tuple[str, str]]:
    """Every configuration with the decision rule's verdict against ``baseline``."""
    base = summarise(runs[baseline], split)
    verdicts = []
    for c in runs:
        if c == baseline:
            continue
        s = summarise(runs[c], split)
        gain_m = s["heldout.medium"] - base["heldout.medium"]
        gain_h = s["heldout.hard"] - base["heldout.hard"]
        worst = min(s[k] - base[k] for k in base if k.startswith("heldout.") and k not in ("heldout.medium", "heldout.hard", "heldout.landmark_mean"))
        known_drop = min(s["known.medium"] - base["known.medium"], s["known.hard"] - base["known.hard"])
        ok = max(gain_m, gain_h) > margin and min(gain_m, gain_h, worst, known_drop) >= -margin
        verdicts.append((c, f"{'REPLACES' if ok else 'keeps baseline'}: held-out Medium {gain_m:+.1f}, Hard {gain_h:+.1f}, "
                            f"worst landmark {worst:+.1f}, known worst {known_drop:+.1f}"))
    return verdicts


def report(args: argparse.Namespace) -> None:
    with open(args.split) as f:
        split = json.load(f)
    runs = load_runs(args.evals)
    if args.only:
        keep = args.only.split(";")
        runs = {c: runs[c] for c in keep}
    names = list(runs)
    print("## Per-query AP, Medium (Hard)\n")
    print("| query | landmark | set | " + " | ".join(names) + " |")
    print("|---|---|---|" + "---:|" * len(names))
    for part in ("known", "heldout"):
        for q in split[part]:
            cells = []
            for c in names:
                ap = runs[c][q]
                cells.append("—" if ap["medium"] is None else f"{ap['medium']:.1f} ({ap['hard']:.1f})" if ap["hard"] is not None
                             else f"{ap['medium']:.1f} (—)")
            print(f"| {q} | {split['landmark'][q]} | {part} | " + " | ".join(cells) + " |")
    print("\n## Means\n")
    summaries = {c: summarise(runs[c], split) for c in names}
    keys = list(next(iter(summaries.values())))
    print("| configuration | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for c in names:
        print(f"| {c} | " + " | ".join(f"{summaries[c][k]:.1f}" for k in keys) + " |")
    print("\n## Leave-one-landmark-out on the known queries (Medium)\n")
    print("| left out | picked on the others | its AP there | best there | best AP |")
    print("|---|---|---:|---|---:|")
    lolo = leave_one_landmark_out(runs, split)
    for r in lolo:
        print(f"| {r['left_out']} | {r['picked']} | {r['picked_ap']:.1f} | {r['oracle']} | {r['oracle_ap']:.1f} |")
    if lolo:
        print(f"| **mean** | | {_mean([r['picked_ap'] for r in lolo]):.1f} | | {_mean([r['oracle_ap'] for r in lolo]):.1f} |")
    if args.baseline:
        print(f"\n## Decision rule against {args.baseline} (margin {args.margin} points)\n")
        for c, v in decide(runs, split, args.baseline, args.margin):
            print(f"- {c}: {v}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    ms = sub.add_parser("make-set")
    ms.add_argument("--out", default="/tmp/loupe-sel")
    rp = sub.add_parser("report")
    rp.add_argument("--split", required=True)
    rp.add_argument("--baseline", default=None, help="LABEL:rerank the candidates are judged against")
    rp.add_argument("--margin", type=float, default=2.0, help="points a difference must exceed to be acted on")
    rp.add_argument("--only", default=None, help="';'-separated LABEL:rerank configurations to report (default: all)")
    rp.add_argument("evals", nargs="+", metavar="LABEL=EVAL.json")
    args = ap.parse_args()
    make_set(args.out) if args.cmd == "make-set" else report(args)


if __name__ == "__main__":
    main()
