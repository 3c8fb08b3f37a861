"""``loupe eval``: index a revisitop-format collection, search every query, score the rankings."""

from __future__ import annotations

import os
import time
from typing import Callable, Sequence

import numpy as np

from cluster.indexing import index_paths
from loupe.client import RetrievalClient
from loupe.rerank_spec import parse_rerank
from services.eval.ground_truth import load_ground_truth
from services.eval.revisitop import evaluate_protocols


def find_image(images_dir: str, name: str) -> str:
    """Path of ``name`` (no extension) in ``images_dir``."""
    for ext in (".jpg", ".jpeg", ".png", ".webp"):
        p = os.path.join(images_dir, name + ext)
        if os.path.exists(p):
            return p
    raise FileNotFoundError(f"images: no file for {name!r} in {images_dir}")


def run_eval(
    client: RetrievalClient,
    images_dir: str,
    gnd_path: str,
    reranks: Sequence[str],
    *,
    batch_size: int = 16,
    skip_index: bool = False,
    graph: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """Index (unless ``skip_index``), build the collection graph (``graph``: when the broker has
    none), search each cropped query per rerank config, score.

    Returns the JSON-able dict documented in the README: ``settings`` and ``runs``.
    """
    gt = load_ground_truth(gnd_path)
    specs = [(r, parse_rerank(r)) for r in reranks]
    index_s = 0.0
    if not skip_index:
        items = [(name, find_image(images_dir, name)) for name in gt.imlist]
        done = [0]

        def tick(n: int) -> None:
            done[0] += n
            if progress:
                progress("index", done[0], len(items))

        rep = index_paths(client, items, batch_size=batch_size, on_progress=tick)
        index_s = rep.seconds
    graph_s = 0.0
    if graph and client.stats().graph_images == 0:
        graph_s = client.build_graph().seconds
    pos = {name: i for i, name in enumerate(gt.imlist)}
    k = min(len(gt.imlist), 1000)
    queries = []
    for qi, qname in enumerate(gt.qimlist):
        with open(find_image(images_dir, qname), "rb") as f:
            queries.append((qname, f.read(), gt.gnd[qi]["bbx"]))
    runs = []
    for name, opts in specs:
        ranked_lists, lat, stages = [], [], []
        for qi, (qname, data, bbx) in enumerate(queries):
            t0 = time.perf_counter()
            resp = client.search(image=data, k=k, crop=bbx, rerank=opts, timeout_s=120)
            lat.append(time.perf_counter() - t0)
            stages.append({t.stage: t.seconds for t in resp.timings})
            ranked_lists.append(_complete_ranking([pos[r.id] for r in resp.results if r.id in pos], len(gt.imlist)))
            if progress:
                progress(f"search[{name}]", qi + 1, len(queries))
        runs.append(_run_report(name, np.stack(ranked_lists, axis=1), gt, [q[0] for q in queries], lat, stages))
    return {
        "settings": {"images": images_dir, "gnd": gnd_path, "database": len(gt.imlist), "queries": len(queries), "k": k, "index_seconds": index_s,
                     "graph_seconds": graph_s},
        "runs": runs,
    }


def _run_report(name: str, ranks: np.ndarray, gt, query_names: list[str], lat: list[float], stages: list[dict[str, float]]) -> dict:
    """One entry of ``runs``: mAP and mP@k per protocol, per-query AP (None = skipped), latency
    (client-observed) and the broker's per-stage median (``stage_ms_p50``; a stage a query
    skipped counts as 0 for it)."""
    scores = evaluate_protocols(ranks, gt)
    run: dict = {"rerank": name}
    for protocol in ("easy", "medium", "hard"):
        run[protocol] = {k: v for k, v in scores[protocol].items() if k == "map" or k.startswith("mp@")}
    run["queries"] = [
        {"name": q, "ap": {p: scores[p]["aps"][i] for p in ("easy", "medium", "hard")}} for i, q in enumerate(query_names)
    ]
    lat_ms = np.asarray(lat) * 1000
    run["latency_ms"] = {"p50": float(np.median(lat_ms)), "p90": float(np.percentile(lat_ms, 90)), "mean": float(lat_ms.mean())}
    names = list(dict.fromkeys(n for st in stages for n in st))
    run["stage_ms_p50"] = {n: float(np.median([st.get(n, 0.0) for st in stages]) * 1000) for n in names}
    return run


def _complete_ranking(ranked: list[int], n: int) -> np.ndarray:
    """Ranked db indices first, then the unranked ones in index order (deterministic tail)."""
    seen = np.zeros(n, dtype=bool)
    out = []
    for i in ranked:
        if not seen[i]:
            seen[i] = True
            out.append(i)
    out.extend(np.flatnonzero(~seen).tolist())
    return np.asarray(out, dtype=np.int64)
