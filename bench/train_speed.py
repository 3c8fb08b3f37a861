"""Training throughput and peak memory of ``loupe train`` on this machine, per loss.

Writes labelled copies of scikit-image's bundled photos (one class per photo, transformed views)
to a temporary directory, then runs one short epoch per loss at the default resolution.

    .venv/bin/python bench/train_speed.py [--steps 10] [--image-size 256] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import cv2
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import machine  # noqa: E402
from cluster.demo import HELD_OUT, INDEXED, PHOTOS, load_photo  # noqa: E402
from services.training.trainer import TrainConfig, train  # noqa: E402


def write_dataset(root: str) -> str:
    """Photos × views as JPEG files plus labels.csv; returns the CSV path."""
    rows = ["image,label"]
    for photo in PHOTOS:
        img = load_photo(photo)
        for view, fn in {**INDEXED, **HELD_OUT}.items():
            name = f"{photo}_{view}.jpg"
            cv2.imwrite(os.path.join(root, name), cv2.cvtColor(fn(img), cv2.COLOR_RGB2BGR))
            rows.append(f"{name},{photo}")
    path = os.path.join(root, "labels.csv")
    with open(path, "w") as f:
        f.write("\n".join(rows) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}; {args.threads} torch threads, {args.image_size} px, {args.steps} steps per loss")
    with tempfile.TemporaryDirectory() as root:
        labels = write_dataset(root)
        for loss in ("npair", "triplet", "contrastive"):
            report = train(TrainConfig(
                images_dir=root, labels_csv=labels, loss=loss, out_path=os.path.join(root, f"{loss}.pt"),
                epochs=1, steps_per_epoch=args.steps, image_size=args.image_size, val_fraction=0.0, progress=False,
            ))
            print(f"{loss:<12} {report.images_per_s:6.2f} images/s  peak RSS {report.peak_rss_bytes / 2**30:.2f} GiB  ({report.wall_s:.1f} s)")


if __name__ == "__main__":
    main()
