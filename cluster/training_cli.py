"""``loupe train`` and ``loupe train-attention``: thin wrappers over services.training / attention."""

from __future__ import annotations

import argparse
import json
import random
import sys
from typing import Any


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register both commands on the CLI's sub-parsers."""
    tr = sub.add_parser("train", help="metric learning: fine-tune the global descriptor (N-pair, triplet, contrastive)")
    tr.add_argument("--images", required=True, help="training images directory")
    tr.add_argument("--labels", default=None, help="CSV image,label (optional header row; image with or without extension). No labels: instance mode, augmented pairs")
    tr.add_argument("--loss", choices=["npair", "triplet", "contrastive"], default="npair")
    tr.add_argument("--out", required=True, help="output model file (loads with --weights)")
    tr.add_argument("--epochs", type=int, default=5)
    tr.add_argument("--batch", type=int, default=8, help="classes per N-pair batch / tuples per step")
    tr.add_argument("--image-size", type=int, default=320)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--resume", action="store_true", help="continue from OUT.ckpt")
    tr.add_argument("--device", default="auto", help="auto (GPU when present), cpu or cuda")
    tr.add_argument("--val-fraction", type=float, default=0.2)
    tr.add_argument("--json", action="store_true")

    ta = sub.add_parser("train-attention", help="train the DELF attention head from image-level labels (backbone frozen)")
    ta.add_argument("--images", required=True, help="images directory")
    ta.add_argument("--labels", required=True, help="CSV image,label (optional header row; image with or without extension)")
    ta.add_argument("--out", required=True, help="output head file (extractor: --attention FILE)")
    ta.add_argument("--layer", default=None, help="backbone tap (default: the extractor's local-feature layer)")
    ta.add_argument("--epochs", type=int, default=10)
    ta.add_argument("--image-side", type=int, default=512)
    ta.add_argument("--val-fraction", type=float, default=0.2)
    ta.add_argument("--seed", type=int, default=0)
    ta.add_argument("--json", action="store_true")


def cmd_train(args: argparse.Namespace) -> int:
    from services.training.trainer import run_training

    report = run_training(
        args.images, args.labels, args.loss, args.out,
        epochs=args.epochs, batch=args.batch, image_size=args.image_size, seed=args.seed,
        resume=args.resume, device=args.device, val_fraction=args.val_fraction, progress=not args.json,
    )
    out: dict[str, Any] = report.to_dict() if hasattr(report, "to_dict") else dict(vars(report))
    print(json.dumps(out, default=float) if args.json else "\n".join(f"{k}: {v}" for k, v in out.items()))
    return 0


def cmd_train_attention(args: argparse.Namespace) -> int:
    import torch

    from services.common.images import decode_image
    from services.extractor.attention import AttentionHead, AttentionTrainConfig, save_attention, train_attention
    from services.extractor.backbone import EfficientNetLite0, load_backbone

    from services.extractor.local_features import LocalConfig

    args.layer = args.layer or LocalConfig().layer
    if not 0.0 <= args.val_fraction < 1.0:
        raise ValueError("--val-fraction: must be in [0, 1)")
    from services.training.labels import read_labels, resolve_image

    rows = list(zip(*read_labels(args.labels)))
    classes = sorted({label for _, label in rows})
    index = {c: i for i, c in enumerate(classes)}
    rng = random.Random(args.seed)
    by_class: dict[str, list[str]] = {}
    for name, label in rows:
        by_class.setdefault(label, []).append(name)
    train, val = [], []
    for label, names in by_class.items():  # stratified split: every class keeps >= 1 training image
        rng.shuffle(names)
        n_val = min(len(names) - 1, int(round(len(names) * args.val_fraction)))
        val += [(n, index[label]) for n in names[:n_val]]
        train += [(n, index[label]) for n in names[n_val:]]

    def load(items):
        imgs = []
        for name, _ in items:
            with open(resolve_image(args.images, name), "rb") as f:
                imgs.append(decode_image(f.read(), max_side=args.image_side))
        return imgs, [y for _, y in items]

    say = (lambda m: print(m, file=sys.stderr, flush=True))
    say(f"{len(train)} training / {len(val)} validation images, {len(classes)} classes; layer {args.layer}")
    tr_x, tr_y = load(train)
    va_x, va_y = load(val)
    torch.manual_seed(args.seed)
    channels, _ = EfficientNetLite0.tap_spec(args.layer)
    head = AttentionHead(channels)
    cfg = AttentionTrainConfig(layer=args.layer, image_side=args.image_side, epochs=args.epochs, seed=args.seed)
    hist = train_attention(load_backbone(), head, tr_x, tr_y, cfg, val_images=va_x, val_labels=va_y)
    meta = {"classes": classes, "train_accuracy": hist.train_accuracy[-1], "val_accuracy": hist.val_accuracy[-1] if hist.val_accuracy else -1.0}
    save_attention(head, args.out, layer=args.layer, meta=meta)
    out = {"out": args.out, "classes": len(classes), "train_images": len(train), "val_images": len(val),
           "loss": hist.loss, "train_accuracy": hist.train_accuracy, "val_accuracy": hist.val_accuracy}
    if args.json:
        print(json.dumps(out))
    else:
        for e, (l, a) in enumerate(zip(hist.loss, hist.train_accuracy)):
            v = f"  val acc {hist.val_accuracy[e]:.3f}" if hist.val_accuracy else ""
            print(f"epoch {e + 1}: loss {l:.4f}  train acc {a:.3f}{v}")
        print(f"wrote {args.out}")
    return 0
