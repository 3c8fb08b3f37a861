"""What a new image size costs each backbone runtime: the ROxford queries, described as queries are.

Each of the 9 known ROxford queries is cropped to its box (a size no other image has) and
described twice with the served query plan (the served extractor settings; global + local
features, no regions, as the default composition asks) by one ``Describer`` per runtime: the first call pays whatever the runtime does for a size it has not
seen (OpenVINO recompiles its kernels for it), the second does not. Wall ms per query, one
process per runtime in turn.

    env GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=4294967296 \\
        .venv/bin/python bench/query_sizes.py --threads 2
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pickle
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import machine, require_roxford  # noqa: E402
from loupe.v1 import types_pb2  # noqa: E402
from services.common.images import decode_image  # noqa: E402
from cluster.config import ClusterConfig  # noqa: E402
from services.extractor.describer import Describer, crop_and_resize  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runtimes", default="openvino,onnxruntime,torch")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = require_roxford()
    gnd = pickle.load(open(root / "gnd_roxford5k_subset.pkl", "rb"))
    print(f"{machine()}; load average {os.getloadavg()[0]:.2f}")
    for runtime in args.runtimes.split(","):
        # the served settings (R-MAC at 512 px, regions, the local pyramid), not the library's defaults
        describer = Describer(dataclasses.replace(ClusterConfig().extractor_config(), runtime=runtime, query_runtime="", threads=args.threads))
        fresh, again = [], []
        for name, g in zip(gnd["qimlist"], gnd["gnd"]):
            image = decode_image((root / "jpg" / f"{name}.jpg").read_bytes())
            x1, y1, x2, y2 = g["bbx"]
            image = crop_and_resize(image, types_pb2.Box(x1=x1, y1=y1, x2=x2, y2=y2), describer.working_side)
            for out in (fresh, again):
                t0 = time.perf_counter()
                describer.describe(image, want_local=True, want_regional=False, query=True)  # as the default composition asks
                out.append(1e3 * (time.perf_counter() - t0))
        print(f"{runtime}: new size median {np.median(fresh):.0f} ms (sum {np.sum(fresh):.0f}), same size again median "
              f"{np.median(again):.0f} ms (sum {np.sum(again):.0f}); load average {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
