"""R-MAC regional max-pooling on the head maps the extractor pools, two ways, same process.

* **strided**: ``amax`` over each region's ``H x W`` window of the NCHW map (what serving did
  before, and what ``regional_vectors`` still does for tensors that need gradients);
* **channels-last**: one ``(B, H, W, C)`` copy, then each region's max over contiguous
  C-vectors (the serving path of ``regional_vectors``).

Maps: the head maps of the served levels of a 1024 x 768 image (1280 channels; 24 x 32 for the
regions, 12 x 16 / 9 x 12 / 6 x 8 for the three global scales), ReLU-like random values. Prints
ms per call (median of ``--repeat``), the ratio, and the ms per image for one image's five
pooling calls (regions at 1024 px + R-MAC at three scales). One torch thread, as a replica's
torch beside a compiled runtime.

    .venv/bin/python bench/rmac_pooling.py [--repeat 50]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import machine  # noqa: E402
from services.extractor.pooling import l2n, mac, regional_vectors, rmac_regions  # noqa: E402

# (H, W) of the head map per served level of a 1024 x 768 image, and how often one image pools it
LEVELS = {(24, 32): 1, (12, 16): 1, (9, 12): 1, (6, 8): 1}


def strided_regional_vectors(x: torch.Tensor, L: int = 3) -> torch.Tensor:
    """The former serving path: ``(B, C, H, W) -> (B, R, C)`` by strided ``amax`` per region."""
    vecs = [mac(x[..., y : y + h, x0 : x0 + w]) for x0, y, w, h in rmac_regions(x.shape[-2], x.shape[-1], L).tolist()]
    return l2n(torch.stack(vecs, dim=1))


def median_ms(fn, x: torch.Tensor, repeat: int) -> float:  # noqa: ANN001 - bench helper
    fn(x)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f}")
    print(f"{'map':>8s} {'strided ms':>11s} {'channels-last ms':>17s} {'ratio':>6s}")
    per_image = {"strided": 0.0, "channels-last": 0.0}
    for (h, w), times in LEVELS.items():
        x = torch.relu(torch.randn(1, 1280, h, w, generator=gen))
        with torch.inference_mode():
            strided = median_ms(strided_regional_vectors, x, args.repeat)
            fast = median_ms(regional_vectors, x, args.repeat)
            torch.testing.assert_close(regional_vectors(x), strided_regional_vectors(x), atol=1e-6, rtol=0)
        per_image["strided"] += strided * times
        per_image["channels-last"] += fast * times
        print(f"{h:>3d} x {w:<3d} {strided:>11.2f} {fast:>17.2f} {strided / fast:>5.1f}x")
    print(f"per image (regions + 3 R-MAC scales): strided {per_image['strided']:.1f} ms, channels-last "
          f"{per_image['channels-last']:.1f} ms ({per_image['strided'] / per_image['channels-last']:.1f}x); "
          f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
