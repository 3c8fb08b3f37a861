"""DELF attention head: keypoint scores learned from image-level labels.

``AttentionHead``: 1x1 conv → ReLU → 1x1 conv → softplus over a stride-16 backbone map, one
non-negative score per location (Noh et al., ICCV 2017). It is trained with the backbone
frozen: the L2-normalised features are averaged with the attention as weights
(:func:`attention_pool`), a linear classifier maps the pooled vector to the image's label and
cross-entropy is minimised (:func:`train_attention`). Only the head is kept (``save_attention``
/ ``load_attention``); the classifier is discarded.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from services.extractor.backbone import BACKBONE_NAME, EfficientNetLite0, preprocess

__all__ = [
    "AttentionHead",
    "AttentionTrainConfig",
    "AttentionHistory",
    "attention_pool",
    "train_attention",
    "save_attention",
    "load_attention",
]

FORMAT_VERSION = 1


def attention_pool(features: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """Attention-weighted average of L2-normalised features (DELF's training pooling).

    Parameters
    ----------
    features : Tensor
        ``(B, C, H, W)`` feature map.
    attention : Tensor
        ``(B, 1, H, W)`` non-negative weights.

    Returns
    -------
    Tensor
        ``(B, C)``: ``mean_hw(attention * features / ||features||)``.
    """
    return (F.normalize(features, dim=1) * attention).mean(dim=(2, 3))


class AttentionHead(nn.Module):
    """``(B, C, H, W) -> (B, 1, H, W)`` scores: conv1x1(C→hidden) → ReLU → conv1x1(hidden→1) → softplus.

    Parameters
    ----------
    in_channels : int
        Channels C of the backbone tap it scores.
    hidden : int
        Width of the hidden 1x1 conv (DELF: 512).
    """

    def __init__(self, in_channels: int, hidden: int = 512) -> None:
        super().__init__()
        if in_channels < 1 or hidden < 1:
            raise ValueError(f"in_channels and hidden must be >= 1, got {in_channels}, {hidden}")
        self.in_channels = in_channels
        self.hidden = hidden
        self.conv1 = nn.Conv2d(in_channels, hidden, 1)
        self.conv2 = nn.Conv2d(hidden, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softplus(self.conv2(F.relu(self.conv1(x))))


@dataclass(frozen=True)
class AttentionTrainConfig:
    """Settings of :func:`train_attention`.

    Attributes
    ----------
    layer : str
        Backbone tap the head scores (must match the local-feature layer).
    image_side : int
        Images are resized (aspect kept) so their longest side is this before the backbone.
    epochs, batch_size : int
        Passes over the training set; images per optimiser step.
    lr, weight_decay : float
        AdamW settings for head + classifier.
    seed : int
        Seeds the shuffling and the classifier initialisation (not the head's).
    """

    layer: str = "block10"
    image_side: int = 512
    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        EfficientNetLite0.tap_spec(self.layer)  # raises ValueError for unknown taps
        for name in ("image_side", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")


@dataclass
class AttentionHistory:
    """Per-epoch training record of :func:`train_attention`.

    Attributes
    ----------
    loss : list of float
        Mean training cross-entropy per epoch.
    train_accuracy : list of float
        Training accuracy per epoch (measured while training).
    val_accuracy : list of float
        Validation accuracy after each epoch; empty without validation data.
    """

    loss: list[float] = field(default_factory=list)
    train_accuracy: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)


@torch.no_grad()
def _tap_features(
    backbone: EfficientNetLite0, images: Sequence[np.ndarray], layer: str, side: int
) -> list[torch.Tensor]:
    """Frozen ``(C, h, w)`` float16 maps, one per image (cached: the backbone never changes)."""
    out = []
    for image in images:
        h, w = image.shape[:2]
        scale = side / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        resized = cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        fmap = backbone.forward_taps(preprocess(resized), [layer])[layer][0]
        out.append(fmap.to(torch.float16).contiguous())
    return out


def _logits(head: AttentionHead, classifier: nn.Linear, fmap: torch.Tensor) -> torch.Tensor:
    x = fmap.to(torch.float32).unsqueeze(0)
    return classifier(attention_pool(x, head(x)))


def train_attention(
    backbone: EfficientNetLite0,
    head: AttentionHead,
    images: Sequence[np.ndarray],
    labels: Sequence[int],
    config: AttentionTrainConfig = AttentionTrainConfig(),
    *,
    val_images: Sequence[np.ndarray] = (),
    val_labels: Sequence[int] = (),
) -> AttentionHistory:
    """Train ``head`` in place from image-level labels, backbone frozen.

    Each image's tap ``(C, h, w)`` is computed once (float16 cache, ``C * h * w * 2`` bytes
    per image: ~0.1 MB at 512 px for the 112-channel ``block10`` tap), then per step:
    ``logits = Linear(attention_pool(fmap, head(fmap)))`` and cross-entropy against the label.
    Images keep their aspect ratio, so a batch is a loop over images (no padding).

    Parameters
    ----------
    backbone : EfficientNetLite0
        Frozen backbone (never updated).
    head : AttentionHead
        Head to train; ``head.in_channels`` must equal the tap's channels.
    images : sequence of np.ndarray
        ``(H, W, 3)`` uint8 RGB training images.
    labels : sequence of int
        Class index per image, in ``[0, num_classes)``; ``num_classes = max(labels) + 1``.
    config : AttentionTrainConfig
        Training settings.
    val_images, val_labels : sequences, optional
        Held-out images and labels for ``val_accuracy``.

    Returns
    -------
    AttentionHistory
        Per-epoch loss and accuracies. The head is left in eval mode.
    """
    channels, _ = EfficientNetLite0.tap_spec(config.layer)
    if head.in_channels != channels:
        raise ValueError(f"head has {head.in_channels} input channels, {config.layer!r} has {channels}")
    if len(images) == 0 or len(images) != len(labels):
        raise ValueError(f"need one label per image, got {len(images)} images, {len(labels)} labels")
    if len(val_images) != len(val_labels):
        raise ValueError(f"got {len(val_images)} val images and {len(val_labels)} val labels")
    if min(labels) < 0 or (len(val_labels) and min(val_labels) < 0):
        raise ValueError("labels must be >= 0")
    num_classes = max(labels) + 1
    if len(val_labels) and max(val_labels) >= num_classes:
        raise ValueError(f"val label {max(val_labels)} has no training images")

    train_maps = _tap_features(backbone, images, config.layer, config.image_side)
    val_maps = _tap_features(backbone, val_images, config.layer, config.image_side)
    gen = torch.Generator().manual_seed(config.seed)
    classifier = nn.Linear(channels, num_classes)
    nn.init.normal_(classifier.weight, std=0.01, generator=gen)
    nn.init.zeros_(classifier.bias)
    params = list(head.parameters()) + list(classifier.parameters())
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    rng = random.Random(config.seed)
    history = AttentionHistory()
    order = list(range(len(train_maps)))
    for _ in range(config.epochs):
        head.train()
        rng.shuffle(order)
        total_loss, correct = 0.0, 0
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            opt.zero_grad(set_to_none=True)
            loss = torch.zeros(())
            for i in batch:
                logits = _logits(head, classifier, train_maps[i])
                target = torch.tensor([labels[i]])
                loss = loss + F.cross_entropy(logits, target)
                correct += int(logits.argmax(dim=1).item() == labels[i])
            (loss / len(batch)).backward()
            opt.step()
            total_loss += float(loss.detach())
        history.loss.append(total_loss / len(order))
        history.train_accuracy.append(correct / len(order))
        if val_maps:
            head.eval()
            with torch.no_grad():
                hits = sum(
                    int(_logits(head, classifier, m).argmax(dim=1).item() == y)
                    for m, y in zip(val_maps, val_labels)
                )
            history.val_accuracy.append(hits / len(val_maps))
    head.eval()
    return history


def save_attention(
    head: AttentionHead, path: str | Path, *, layer: str, meta: dict | None = None
) -> None:
    """Write the head to ``path`` as ``torch.save({"state_dict", "meta"})``.

    Parameters
    ----------
    head : AttentionHead
        Trained head.
    path : str or Path
        Destination file.
    layer : str
        Backbone tap the head was trained on (stored in meta, checked by the extractor's owner).
    meta : dict, optional
        Extra JSON-like metadata (str/int/float/bool/list/dict only, so ``weights_only`` loads
        work), e.g. training accuracy; the reserved keys below win.
    """
    channels, _ = EfficientNetLite0.tap_spec(layer)
    if channels != head.in_channels:
        raise ValueError(f"head has {head.in_channels} input channels, {layer!r} has {channels}")
    info = dict(meta or {})
    info.update(
        format_version=FORMAT_VERSION,
        backbone=BACKBONE_NAME,
        layer=layer,
        in_channels=head.in_channels,
        hidden=head.hidden,
    )
    torch.save({"state_dict": head.state_dict(), "meta": info}, str(path))


def load_attention(path: str | Path) -> tuple[AttentionHead, dict]:
    """Load a head written by :func:`save_attention` (``weights_only=True``).

    Returns
    -------
    head : AttentionHead
        In eval mode.
    meta : dict
        Its metadata, including ``layer``, ``in_channels``, ``hidden``, ``backbone``.
    """
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or "state_dict" not in obj or "meta" not in obj:
        raise ValueError(f"{path!s} is not an attention-head file (expected 'state_dict', 'meta')")
    meta = obj["meta"]
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path!s}: unsupported format_version {meta.get('format_version')!r}")
    if meta.get("backbone") != BACKBONE_NAME:
        raise ValueError(f"{path!s}: head is for backbone {meta.get('backbone')!r}, not {BACKBONE_NAME!r}")
    head = AttentionHead(int(meta["in_channels"]), int(meta["hidden"]))
    head.load_state_dict(obj["state_dict"], strict=True)
    return head.eval(), meta
