"""Choosing defaults without overfitting the 9 known ROxford-subset queries.

Two steps, so the expensive part (indexing through a real cluster) is done once per extraction
setting and every analysis reads the saved ``loupe eval --json`` outputs:

``make-set``
    Writes the confirmation set (``bench/heldout.py``): a reduced database (the held-out
    photos removed) whose ground truth lists the 9 known queries, then the held-out queries
    made from database photos of the landmarks with >= ``--min-positives`` positives, as whole
    photos (``gnd.json``); plus ``split.json`` (which query is known / held-out, each query's
    landmark, and the split's parameters).

``make-crops``
    After ``loupe eval --gnd gnd.json`` indexed that reduced database into ``--data-dir`` (and
    the cluster stopped): the held-out queries as **crops** (issue 27), boxed by geometric
    verification against their landmark's other positives (``bench/heldout_crops.py``), in
    ``gnd-crop.json`` (same database and labels, only the held-out ``bbx`` differ) and
    ``crops.json`` (each box and its evidence); prints the crop-size distribution beside the
    known queries' boxes.

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
    .venv/bin/python bench/select_defaults.py make-crops --out /tmp/loupe-sel --data-dir DATA_DIR
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
from bench.heldout import CropRule, HeldoutSplit, box_shape, heldout_split, to_json, with_boxes  # noqa: E402


def _image_size(name: str) -> tuple[int, int]:
    from PIL import Image

    with Image.open(require_roxford() / "jpg" / f"{name}.jpg") as im:
        return im.size


def _split(params: dict) -> HeldoutSplit:
    gt = load_ground_truth(require_roxford() / "gnd_roxford5k_subset.pkl")
    return heldout_split(gt, _image_size, **params)


def make_set(args: argparse.Namespace) -> None:
    params = {"min_positives": args.min_positives, "fraction": args.fraction, "max_per_landmark": args.max_per_landmark,
              "min_easy": args.min_easy}
    split = _split(params)
    out = args.out
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "gnd.json"), "w") as f:
        json.dump(to_json(split.gt), f)
    with open(os.path.join(out, "split.json"), "w") as f:
        json.dump({"known": split.known, "heldout": split.heldout, "landmark": split.landmark, "params": params}, f, indent=1)
    print(f"database {len(split.gt.imlist)} images (held out {len(split.heldout)}), "
          f"{len(split.known)} known + {len(split.heldout)} held-out queries -> {out}/gnd.json, {out}/split.json")


def _quartiles(values: list[float]) -> str:
    q = np.percentile(values, [0, 25, 50, 75, 100])
    return " / ".join(f"{v:.2f}" for v in q)


def make_crops(args: argparse.Namespace) -> None:

    from bench.heldout_crops import heldout_boxes

    with open(os.path.join(args.out, "split.json")) as f:
        split = _split(json.load(f)["params"])
    gt = split.gt
    known_shapes = [box_shape(g["bbx"], *_image_size(q)) for q, g in zip(gt.qimlist, gt.gnd) if q in split.known]
    rule = CropRule(fallback_area=float(np.median([a for a, _ in known_shapes])))
    boxes = heldout_boxes(split, args.data_dir, require_roxford() / "jpg", rule)
    cropped = with_boxes(split, {q: b.box for q, b in boxes.items()})
    with open(os.path.join(args.out, "gnd-crop.json"), "w") as f:
        json.dump(to_json(cropped.gt), f)
    rows = {q: {**b.__dict__, "area": box_shape(b.box, b.width, b.height)[0], "aspect": box_shape(b.box, b.width, b.height)[1],
                "landmark": split.landmark[q]} for q, b in boxes.items()}
    with open(os.path.join(args.out, "crops.json"), "w") as f:
        json.dump({"rule": rule.__dict__, "crops": rows}, f, indent=1)
    print(f"fallback area (median of the known boxes) {rule.fallback_area:.2f}; "
          f"{sum(not b.from_inliers for b in boxes.values())} of {len(boxes)} boxes by the fallback")
    print("| query | landmark | verified / pairs | inlier points | box | area | aspect |")
    print("|---|---|---:|---:|---|---:|---:|")
    for q, r in rows.items():
        box = ", ".join(f"{v:.0f}" for v in r["box"])
        print(f"| {q} | {r['landmark']} | {r['verified']} / {r['pairs']} | {r['points']} | [{box}]{'' if r['from_inliers'] else ' fallback'} "
              f"| {r['area']:.2f} | {r['aspect']:.2f} |")
    print("\ncrop shape, min / 25% / median / 75% / max:")
    print(f"  known queries' bbx ({len(known_shapes)}): area {_quartiles([a for a, _ in known_shapes])}, "
          f"aspect {_quartiles([s for _, s in known_shapes])}")
    print(f"  held-out crops ({len(rows)}): area {_quartiles([r['area'] for r in rows.values()])}, "
          f"aspect {_quartiles([r['aspect'] for r in rows.values()])}")
    print(f"-> {args.out}/gnd-crop.json, {args.out}/crops.json")


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
    ms.add_argument("--min-positives", type=int, default=10, help="Medium positives a landmark needs to give held-out queries")
    ms.add_argument("--fraction", type=float, default=1 / 3, help="share of a landmark's easy positives held out")
    ms.add_argument("--max-per-landmark", type=int, default=8)
    ms.add_argument("--min-easy", type=int, default=None, help="easy positives from which a landmark gives at least one query")
    mc = sub.add_parser("make-crops")
    mc.add_argument("--out", default="/tmp/loupe-sel", help="the make-set directory")
    mc.add_argument("--data-dir", required=True, help="data directory of the (stopped) cluster that indexed its gnd.json")
    rp = sub.add_parser("report")
    rp.add_argument("--split", required=True)
    rp.add_argument("--baseline", default=None, help="LABEL:rerank the candidates are judged against")
    rp.add_argument("--margin", type=float, default=2.0, help="points a difference must exceed to be acted on")
    rp.add_argument("--only", default=None, help="';'-separated LABEL:rerank configurations to report (default: all)")
    rp.add_argument("evals", nargs="+", metavar="LABEL=EVAL.json")
    args = ap.parse_args()
    {"make-set": make_set, "make-crops": make_crops, "report": report}[args.cmd](args)


if __name__ == "__main__":
    main()
