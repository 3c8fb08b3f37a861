"""Indexing through the cluster against the bare eager backbone, same images, same run.

1. **bare eager passes** (before): eager torch runs only the backbone passes that the served
   descriptor set needs for each image (``Describer.levels``: global, regional and local levels,
   to their taps), preprocessing included, nothing else — the rate a naive implementation could
   at best reach;
2. **``loupe index``** of the same images (a temporary cluster with the served defaults,
   ``--no-graph``; once per ``--runtime``), its own images/s (cluster start-up excluded);
3. **bare eager passes** again (after), so that the machine's drift brackets the index run.

Prints both rates and their ratio (index / median of the two bare rates). Issue 26 asks for
>= 1.5x.

    env GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=4294967296 \\
        .venv/bin/python bench/index_vs_backbone.py [--images 120] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import REPO_ROOT, machine, require_roxford  # noqa: E402
from bench.extract_speed import bare_passes, served_servicer  # noqa: E402
from services.common.images import decode_image  # noqa: E402


def bare_rate(paths: list[str], threads: int) -> float:
    """Images per second of the served levels' eager backbone passes (decode and preprocess included)."""
    torch.set_num_threads(threads)
    svc = served_servicer("torch", threads)  # the cluster's default descriptor set
    with torch.inference_mode():
        bare_passes(svc, decode_image(open(paths[0], "rb").read()))  # warm-up, not counted
        t0 = time.perf_counter()
        for path in paths:
            bare_passes(svc, decode_image(open(path, "rb").read()))
    return len(paths) / (time.perf_counter() - t0)


def index_rate(directory: str, runtime: str) -> dict:
    """``loupe index`` of ``directory`` on a temporary cluster whose extractor runs ``runtime``; its JSON report."""
    with tempfile.TemporaryDirectory(prefix="loupe-bench-index-") as data:
        out = subprocess.run([os.path.join(REPO_ROOT, ".venv", "bin", "loupe"), "index", directory, "--data-dir", data, "--no-graph",
                              "--extractor-runtime", runtime, "--json"], capture_output=True, text=True, check=False, cwd=REPO_ROOT)
    if out.returncode:
        raise SystemExit(f"loupe index failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=120, help="ROxford database images, in name order")
    p.add_argument("--threads", type=int, default=2, help="eager torch threads (a replica's on this machine)")
    p.add_argument("--runtime", action="append", help="extractor runtime of an index run (repeatable, run in turn; default openvino)")
    args = p.parse_args(argv)
    rox = require_roxford()
    names = sorted(n for n in os.listdir(rox / "jpg") if n.endswith(".jpg"))[: args.images]
    paths = [str(rox / "jpg" / n) for n in names]
    print(f"# {machine()}; {len(paths)} images; load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="loupe-bench-images-") as d:
        for path, name in zip(paths, names):
            os.symlink(path, os.path.join(d, name))
        before = bare_rate(paths, args.threads)
        print(f"bare eager passes (before): {before:.2f} images/s; load average {os.getloadavg()[0]:.2f}", flush=True)
        reps: dict[str, list[float]] = {}
        for runtime in args.runtime or ["openvino"]:
            rep = index_rate(d, runtime)
            reps.setdefault(runtime, []).append(rep["images_per_s"])
            print(f"loupe index --extractor-runtime {runtime}: {rep['images_per_s']:.2f} images/s ({rep['indexed']} in "
                  f"{rep['seconds']:.1f} s); load average {os.getloadavg()[0]:.2f}", flush=True)
        after = bare_rate(paths, args.threads)
        print(f"bare eager passes (after): {after:.2f} images/s; load average {os.getloadavg()[0]:.2f}")
    bare = statistics.median([before, after])
    for runtime, rates in reps.items():
        print(f"index ({runtime}, median of {len(rates)}) / bare eager (median of 2): {statistics.median(rates) / bare:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
