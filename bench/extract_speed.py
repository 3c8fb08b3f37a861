"""Extraction cost per image at a 1024-px working image: global descriptor only, global + local
features as separate extractors, and the served path (``ExtractorServicer._describe``: global,
regional vectors at 1024 px and local features from shared backbone passes; also with the
regions from the 512-px global level, which needs no extra backbone work), same images, same
process. Uses ROxford images when ../shared/data is present, else scikit-image photos upscaled.

    .venv/bin/python bench/extract_speed.py [--images 20] [--threads 2] [--repeat 3]
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
from services.extractor.global_descriptor import GlobalConfig, GlobalExtractor, resize_max_side  # noqa: E402
from services.extractor.local_features import LocalConfig, LocalExtractor  # noqa: E402
from services.extractor.servicer import ExtractorConfig, ExtractorServicer  # noqa: E402


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    imgs, what = images(args.images)
    svc = ExtractorServicer(ExtractorConfig(global_config=GlobalConfig(pooling="rmac", max_side=512), local_config=LocalConfig()))
    svc512 = ExtractorServicer(ExtractorConfig(global_config=svc.global_config, local_config=LocalConfig(), regional_max_side=0))
    g = GlobalExtractor(svc.backbone, svc.global_config)
    loc = LocalExtractor(svc.backbone, svc.local_config)
    ways = {
        "global only (R-MAC 3 scales, 512 px)": lambda im: g.extract(im),
        "global + local, separate passes": lambda im: (g.extract(im), loc.extract(im)),
        "global + regional@512 + local, shared passes": lambda im: svc512._describe(im, want_local=True),
        "global + regional@1024 + local, shared passes (served)": lambda im: svc._describe(im, want_local=True),
    }
    print(f"machine: {machine()}; {what}; {args.threads} torch threads; load average {os.getloadavg()[0]:.1f}")
    runs: dict[str, list[float]] = {k: [] for k in ways}
    for name, fn in ways.items():
        fn(imgs[0])  # warm-up
    for _ in range(args.repeat):  # interleaved, so load changes hit every way alike
        for name, fn in ways.items():
            t0 = time.perf_counter()
            for im in imgs:
                fn(resize_max_side(im, 1024))
            runs[name].append((time.perf_counter() - t0) / len(imgs))
    base = np.median(runs["global + local, separate passes"])
    for name, t in runs.items():
        m = np.median(t)
        print(f"{name:58s} {1e3 * m:8.1f} ms/image  {1 / m:6.2f} images/s  ({m / base:.2f}x separate global+local)")


if __name__ == "__main__":
    main()
