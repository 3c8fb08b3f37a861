"""Geometric verification benchmark: loupe DELF-style local features vs RootSIFT, and the
per-pair cost before/after int8-code matching (issue 26, item 3).

On ``../shared/data/phototourism_sample`` (13 photos, 4 landmarks, 7 listed same-scene pairs,
60 cross-landmark pairs) it reports, per method: extraction images/s, inliers of the listed
pairs and of the cross-landmark pairs, and verification time per pair (median / p99). It also
times match + RANSAC on synthetic 1000 x 1000 40-D descriptor pairs for each robust estimator,
sequentially and through a thread pool.

``before/after`` (in the same run, candidates decoded from int8 as the shards store them,
one thread): the served verification before (MAGSAC up to 1000 iterations) and after
(``BrokerConfig().verify``), the after split into matching and fitting, and every pair's
inliers both ways.

Run (threads and allocator settings belong to the benchmark, not the library)::

    env GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=4294967296 \\
        .venv/bin/python bench/verify_pairs.py --threads 2
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import SHARED_DATA, machine  # noqa: E402
from services.broker.config import BrokerConfig  # noqa: E402
from services.common.images import decode_image  # noqa: E402
from services.extractor.backbone import load_backbone  # noqa: E402
from services.extractor.local_features import LocalConfig, LocalExtractor  # noqa: E402
from services.space.whitening import LocalPCA  # noqa: E402
from bench.rootsift import ROOTSIFT_RATIO, extract_rootsift  # noqa: E402
from services.common.local_candidates import dequantised  # noqa: E402
from services.index.store import LocalStore  # noqa: E402
from services.rerank.verify import (  # noqa: E402
    VerifyParams, fit_matches, match_descriptors, verify_many, verify_pair,
)

Features = dict[str, tuple[np.ndarray, np.ndarray]]


class _Timer:
    """Wall-clock and calling-thread CPU time of each timed block. On a shared machine the CPU
    time is the better estimate of the cost on an idle one (no preemption counted) as long as
    the work runs in the calling thread (OpenCV threads = 1)."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def __enter__(self) -> _Timer:
        self._wall, self._cpu = time.perf_counter(), time.thread_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall.append(time.perf_counter() - self._wall)
        self.cpu.append(time.thread_time() - self._cpu)

    def summary(self) -> str:
        def stats(t: list[float]) -> str:
            ms = np.asarray(t) * 1e3
            return f"median {np.median(ms):.2f} ms, p99 {np.percentile(ms, 99):.2f} ms"

        return f"wall {stats(self.wall)}; thread CPU {stats(self.cpu)}"


def _extract_all(images: dict[str, np.ndarray], fn: Callable[[np.ndarray], tuple]) -> tuple[dict, str]:
    fn(next(iter(images.values())))  # warm-up
    start, cpu = time.perf_counter(), time.process_time()
    out = {n: fn(im) for n, im in images.items()}
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return out, f"{len(images) / wall:.2f} img/s wall, {1e3 * cpu / len(images):.0f} ms process CPU per image"


def _evaluate(name: str, feats: Features, same: list, cross: list, params: VerifyParams, repeat: int) -> None:
    timer = _Timer()
    inliers: dict[tuple[str, str], int] = {}
    for _ in range(repeat):
        for a, b in same + cross:
            with timer:
                inliers[a, b] = verify_pair(*feats[a], *feats[b], params).inliers
    s = [inliers[p] for p in same]
    c = sorted(inliers[p] for p in cross)
    print(f"{name}: listed same-scene pairs {s}")
    print(f"{name}: cross-landmark pairs max {c[-1]}, top-5 {c[-5:]}, mean {np.mean(c):.1f}")
    print(f"{name}: verification per pair ({len(timer.wall)} pairs): {timer.summary()}")


def _synthetic(rng: np.random.Generator, n: int = 1000, dim: int = 40) -> tuple:
    def unit(x: np.ndarray) -> np.ndarray:
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    n_true = int(rng.integers(10, 200))
    q, c = unit(rng.standard_normal((n, dim))), unit(rng.standard_normal((n, dim)))
    c[:n_true] = unit(q[:n_true] + 0.3 * rng.standard_normal((n_true, dim)) / np.sqrt(dim))
    q_xy = rng.uniform(0, 1024, (n, 2)).astype(np.float32)
    c_xy = rng.uniform(0, 1024, (n, 2)).astype(np.float32)
    c_xy[:n_true] = q_xy[:n_true] @ np.array([[0.9, -0.1], [0.1, 0.95]]) + (30, -20)
    return q_xy, q, c_xy, c


def _bench_synthetic(repeat: int, threads: int) -> None:
    rng = np.random.default_rng(0)
    pairs = [_synthetic(rng) for _ in range(50)]
    for estimator in ("magsac", "accurate", "ransac"):
        params = VerifyParams(estimator=estimator)
        timer = _Timer()
        for _ in range(repeat):
            for pair in pairs:
                with timer:
                    verify_pair(*pair, params)
        print(f"synthetic 1000x1000 40-D, {estimator}: match + RANSAC {timer.summary()}")
    query = (pairs[0][0], pairs[0][1])
    candidates = [(p[2], p[3]) for p in pairs] * 2
    with ThreadPoolExecutor(max_workers=threads) as pool:  # as the broker's verify pool runs pairs
        list(pool.map(lambda c: verify_pair(*query, *c), candidates[:4]))
        start = time.perf_counter()
        list(pool.map(lambda c: verify_pair(*query, *c), candidates))
        elapsed = time.perf_counter() - start
    print(f"pairs on a pool of {threads} threads: {1e3 * elapsed / len(candidates):.2f} ms per candidate (throughput)")


def _before_after(queries: list[tuple], candidates: list[list[tuple]], label: str, repeat: int) -> None:
    """``queries[i]`` = (kp, float desc); ``candidates[i]`` = [(kp, desc decoded from int8 as a shard
    decodes it, side)]. Thread CPU per pair (one core) of the served verification before this
    change (``VerifyParams(min_inliers=16)``: MAGSAC up to 1000 iterations) and after
    (``BrokerConfig().verify``), with the after split into matching and fitting."""
    after_params = BrokerConfig().verify
    before_params = VerifyParams(min_inliers=16)
    n_pairs = sum(len(c) for c in candidates)
    before, after, match_t, fit_t = _Timer(), _Timer(), _Timer(), _Timer()
    inl_before: list[int] = []
    inl_after: list[int] = []
    for r in range(repeat):
        for (q_kp, q_desc), cands in zip(queries, candidates):
            with before:
                res_b = [verify_pair(q_kp, q_desc, kp, desc, before_params, candidate_side=side) for kp, desc, side in cands]
            with after:
                res_a = verify_many((q_kp, q_desc), cands, after_params)
            with match_t:
                pairs = [match_descriptors(q_desc, desc, max_matches=after_params.max_matches) for _, desc, _ in cands]
            with fit_t:
                for (kp, _, side), p in zip(cands, pairs):
                    fit_matches(q_kp, kp, p, after_params, side)
            if r == 0:
                inl_before += [x.inliers for x in res_b]
                inl_after += [x.inliers for x in res_a]

    def per(t: _Timer) -> str:
        per_query = n_pairs / len(queries)
        return f"{1e3 * np.median(t.cpu) / per_query:.2f} ms CPU per pair ({1e3 * np.median(t.wall) / per_query:.2f} wall)"

    print(f"{label}: {len(queries)} queries, {n_pairs} pairs, median over queries x {repeat} repeats")
    print(f"  before ({before_params.max_iters} iterations, every match): {per(before)}")
    print(f"  after ({after_params.max_iters} iterations, max_matches {after_params.max_matches}): {per(after)}")
    print(f"    of which matching {per(match_t)}, fitting {per(fit_t)}")
    a, b = np.asarray(inl_before), np.asarray(inl_after)
    vb, va = a >= before_params.min_inliers, b >= after_params.min_inliers
    print(f"  inliers identical in {int((a == b).sum())}/{len(a)} pairs; verified before {int(vb.sum())}, after {int(va.sum())}, "
          f"both {int((va & vb).sum())}")


def _stored(desc: np.ndarray) -> np.ndarray:
    """Descriptors as a shard stores (int8) and decodes them."""
    q = LocalStore.quantize(np.zeros((len(desc), 4)), desc)
    return dequantised(q.descriptors, q.scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=SHARED_DATA / "phototourism_sample")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads and verify pool size")
    parser.add_argument(
        "--cv2-threads", type=int, default=1,
        help="OpenCV threads per call (1: pairs run in parallel through the verify pool instead)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="timing repetitions over all pairs")
    parser.add_argument("--layer", default=LocalConfig.layer)
    parser.add_argument("--scales", default=",".join(map(str, LocalConfig.scales)))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.cv2_threads)
    if not (args.data / "landmarks.csv").exists():
        raise SystemExit(f"{args.data} is absent: this benchmark needs ../shared/data (see its README)")
    load = os.getloadavg()[0]
    print(f"{machine()}; load average {load:.1f}; torch threads {args.threads}, OpenCV threads {args.cv2_threads}")

    with open(args.data / "landmarks.csv", newline="") as f:
        landmark = {row["image"]: row["landmark"] for row in csv.DictReader(f)}
    lines = (args.data / "phototourism_sample_pairs.txt").read_text().splitlines()
    same = [tuple(line.split()) for line in lines if line.strip()]
    cross = [(a, b) for a, b in itertools.combinations(sorted(landmark), 2) if landmark[a] != landmark[b]]
    images = {n: decode_image((args.data / "jpg" / n).read_bytes()) for n in sorted(landmark)}
    sides = sorted({max(im.shape[:2]) for im in images.values()})
    print(f"{len(images)} images (longest side {sides[0]}..{sides[-1]} px), {len(same)} listed pairs, "
          f"{len(cross)} cross-landmark pairs")

    config = LocalConfig(layer=args.layer, scales=tuple(float(s) for s in args.scales.split(",")))
    extractor = LocalExtractor(load_backbone(), config)
    local, rate = _extract_all(images, extractor.extract)
    print(f"loupe {config.layer} scales {config.scales}: extraction {rate} ({args.threads} threads)")
    pca = LocalPCA().fit(np.concatenate([f.descriptors for f in local.values()]), dim=40)
    loupe = {n: (f.keypoints, pca.apply(f.descriptors)) for n, f in local.items()}
    sift, rate = _extract_all(images, extract_rootsift)
    print(f"RootSIFT-1000: extraction {rate}")

    # before/after: each photo queries the 12 others, candidates as the shards store them
    names = sorted(loupe)
    queries = [loupe[n] for n in names]
    cands = [[(loupe[m][0], _stored(loupe[m][1]), float(max(images[m].shape[:2]))) for m in names if m != n] for n in names]
    _before_after(queries, cands, "phototourism, every photo against the 12 others", args.repeat)
    rng = np.random.default_rng(1)
    synth = [_synthetic(rng) for _ in range(40)]
    s_queries = [(synth[i][0], synth[i][1]) for i in range(0, 40, 10)]
    s_cands = [[(p[2], _stored(p[3]), None) for p in synth[i : i + 10]] for i in range(0, 40, 10)]
    _before_after(s_queries, s_cands, "synthetic 1000 x 1000 40-D", args.repeat)

    _evaluate("loupe + MNN + MAGSAC affine", loupe, same, cross, VerifyParams(), args.repeat)
    _evaluate("loupe + ratio 0.9 + MAGSAC affine", loupe, same, cross, VerifyParams(matcher="ratio"), args.repeat)
    rootsift = VerifyParams(matcher="ratio", ratio=ROOTSIFT_RATIO)
    _evaluate(f"RootSIFT + ratio {ROOTSIFT_RATIO} + MAGSAC affine", sift, same, cross, rootsift, args.repeat)
    _bench_synthetic(args.repeat, args.threads)


if __name__ == "__main__":
    main()
