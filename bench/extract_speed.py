"""Extraction cost per image at a 1024-px working image, per backbone runtime, same process.

For each runtime (eager torch, ONNX Runtime, OpenVINO) it times, on the same images, interleaved:

* **bare passes**: only the backbone passes the served descriptor set needs (the 1024-, 512-,
  362- and 256-px levels of ``Describer.levels``, to the local tap and the head);
* **served**: ``Describer.describe`` with the default descriptor set (R-MAC 3 scales
  at 512 px, regions at 1024 px reduced to 5 centroids, local features 0.25/0.5/1);
* **global only**: the global descriptor alone (3 passes at 512/362/256 px).

Threads as in a replica (``cluster.actors``): ``--threads`` for the runtime, torch on one
thread beside a compiled runtime (all ``--threads`` for eager torch). It prints ms/image (wall, and CPU seconds of this process, which a busy machine distorts
less), the served/bare ratio of each runtime (the overhead around the backbone) and every
way against eager torch's bare passes, plus export/compile seconds. Medians over ``--repeat``
passes. Uses ROxford images when ../shared/data is present, else scikit-image photos upscaled.

    .venv/bin/python bench/extract_speed.py [--images 8] [--threads 2] [--repeat 3] [--runtimes torch,onnxruntime,openvino]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import ROXFORD, machine  # noqa: E402
from services.common.images import decode_image  # noqa: E402
from services.extractor.backbone import preprocess  # noqa: E402
from services.extractor.global_descriptor import GlobalConfig, resize_max_side  # noqa: E402
from services.extractor.local_features import LocalConfig  # noqa: E402
from services.extractor.config import ExtractorConfig  # noqa: E402
from services.extractor.describer import Describer  # noqa: E402


def images(n: int) -> tuple[list[np.ndarray], str]:
    jpg = ROXFORD / "jpg"
    if jpg.is_dir():
        names = sorted(os.listdir(jpg))[:n]
        return [decode_image((jpg / f).read_bytes(), max_side=1024) for f in names], f"{len(names)} ROxford images"
    import cv2
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    out = [cv2.resize(p, (1024, round(1024 * p.shape[0] / p.shape[1])), interpolation=cv2.INTER_LINEAR) for p in photos]
    return (out * n)[:n], f"{n} scikit-image photos upscaled to 1024 px"


def served_servicer(runtime: str, threads: int) -> Describer:
    """The cluster's default descriptor set (``ClusterConfig`` defaults) on ``runtime``."""
    return Describer(
        ExtractorConfig(global_config=GlobalConfig(pooling="rmac", max_side=512), local_config=LocalConfig(), runtime=runtime, threads=threads)
    )


def as_replica(runtime: str, threads: int, fn):  # noqa: ANN001, ANN201 - bench helper
    """Run ``fn`` with torch's threads as an extractor replica sets them (``cluster.actors``):
    all of them for eager torch, one beside a compiled runtime (which has its own ``threads``)."""

    def run(im: np.ndarray) -> object:
        torch.set_num_threads(threads if runtime == "torch" else 1)
        try:
            return fn(im)
        finally:
            torch.set_num_threads(threads)

    return run


def bare_passes(svc: Describer, image: np.ndarray) -> None:
    """The backbone passes the served path needs, and nothing else (preprocessing included)."""
    for level, taps in svc.levels(image, want_local=True, want_regional=True):
        svc.backbone.forward_taps(preprocess(level), taps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--runtimes", default="torch,onnxruntime,openvino")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    imgs, what = images(args.images)
    imgs = [resize_max_side(im, 1024) for im in imgs]
    ways = {}
    for rt in args.runtimes.split(","):
        svc = served_servicer(rt, args.threads)
        print(f"{rt}: export {svc.backbone.export_s:.1f} s, load/compile {svc.backbone.compile_s:.1f} s", flush=True)
        ways[f"bare passes ({rt})"] = as_replica(rt, args.threads, lambda im, s=svc: bare_passes(s, im))
        ways[f"served ({rt})"] = as_replica(rt, args.threads, lambda im, s=svc: s.describe(im, want_local=True))
        ways[f"global only ({rt})"] = as_replica(rt, args.threads, lambda im, s=svc: s.describe(im, want_local=False, want_regional=False))
    load0 = os.getloadavg()[0]
    print(f"machine: {machine()}; {what}; {args.threads} threads; load average {load0:.1f}", flush=True)
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in ways}
    with torch.inference_mode():
        for fn in ways.values():
            fn(imgs[0])  # warm-up
        for _ in range(args.repeat):  # interleaved, so load changes hit every way alike
            for name, fn in ways.items():
                t0, c0 = time.perf_counter(), time.process_time()
                for im in imgs:
                    fn(im)
                runs[name].append(((time.perf_counter() - t0) / len(imgs), (time.process_time() - c0) / len(imgs)))
    wall = {k: float(np.median([w for w, _ in v])) for k, v in runs.items()}
    cpu = {k: float(np.median([c for _, c in v])) for k, v in runs.items()}
    base = "bare passes (torch)" if "bare passes (torch)" in wall else next(iter(wall))
    print(f"load average at the end {os.getloadavg()[0]:.1f} (start {load0:.1f})")
    print(f"{'way':28s} {'wall ms':>8s} {'img/s':>6s} {'cpu ms':>8s} {'wall vs ' + base:>28s} {'served/bare':>11s}")
    for name in ways:
        rt = name[name.index("(") + 1 : -1]
        ratio = f"{wall[name] / wall[f'bare passes ({rt})']:.2f}x" if name.startswith("served") else ""
        cratio = f" (cpu {cpu[name] / cpu[f'bare passes ({rt})']:.2f}x)" if name.startswith("served") else ""
        print(f"{name:28s} {1e3 * wall[name]:8.1f} {1 / wall[name]:6.2f} {1e3 * cpu[name]:8.1f} {wall[name] / wall[base]:27.2f}x {ratio:>11s}{cratio}")


if __name__ == "__main__":
    main()
