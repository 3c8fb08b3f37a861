"""Self-supervised labels for metric learning: the collection's own geometrically verified pairs.

Against a running cluster (``--address``), every indexed image searches by its id with
verification of its global top-``--candidates`` (``verify:N``; stored local features, nothing
extracted); a pair that verifies (>= the server's min inliers) links two images, and the
connected components of those links become classes. Writes the ``image,label`` CSV that
``loupe train --labels`` reads (components of >= 2 images only) and prints the component
sizes. No ground truth is read: a deployment can do this on its own collection.

    .venv/bin/python bench/verified_components.py --address 127.0.0.1:50071 --out labels.csv [--candidates 20]
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from loupe.client import RetrievalClient  # noqa: E402
from loupe.rerank_spec import parse_rerank  # noqa: E402


def components(links: list[tuple[str, str]], ids: list[str]) -> dict[str, int]:
    """Union-find over ``links``: image id → component number (every id of ``ids`` has one)."""
    parent = {i: i for i in ids}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in links:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = sorted({find(i) for i in ids})
    number = {r: n for n, r in enumerate(roots)}
    return {i: number[find(i)] for i in ids}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", required=True)
    p.add_argument("--out", required=True, help="labels CSV to write")
    p.add_argument("--candidates", type=int, default=20, help="global neighbours verified per image")
    p.add_argument("--link-inliers", type=int, default=0,
                   help="inliers a verified pair needs to link two images (0 = the server's threshold); chains of weak "
                        "links merge landmarks into one component")
    p.add_argument("--pairs", default="", help="also write every verified pair as 'query,result,inliers' CSV here "
                                               "(what bench/learned_whitening.py learns from)")
    args = p.parse_args(argv)
    client = RetrievalClient(args.address)
    ids = [im.id for im in client.iter_images(page_size=500)]
    rerank = parse_rerank(f"verify:{args.candidates}")
    links: list[tuple[str, str]] = []
    verified: list[tuple[str, str, int]] = []
    t0 = time.perf_counter()
    for n, image_id in enumerate(ids):
        resp = client.search(image_id=image_id, k=args.candidates, rerank=rerank, timeout_s=120.0)
        links += [(image_id, r.id) for r in resp.results if r.verified and r.stages.inliers >= args.link_inliers]
        verified += [(image_id, r.id, r.stages.inliers) for r in resp.results if r.verified and r.id != image_id]
        if n % 100 == 0:
            print(f"{n}/{len(ids)} images, {len(links)} verified links, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    comp = components(links, ids)
    sizes = collections.Counter(comp.values())
    kept = {c for c, s in sizes.items() if s >= 2}
    with open(args.out, "w") as f:
        f.write("image,label\n")
        for image_id in ids:
            if comp[image_id] in kept:
                f.write(f"{image_id},c{comp[image_id]}\n")
    if args.pairs:
        with open(args.pairs, "w") as f:
            f.write("query,result,inliers\n")
            f.writelines(f"{a},{b},{n}\n" for a, b, n in verified)
    dist = collections.Counter(sizes[c] for c in kept)
    print(f"{len(ids)} images, {len(links)} verified links (directed), {len(kept)} components of >= 2 images covering "
          f"{sum(sizes[c] for c in kept)} images; sizes: {dict(sorted(dist.items()))}; {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
