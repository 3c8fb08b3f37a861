"""DELF-style local features (Noh et al., ICCV 2017) from a frozen EfficientNet-Lite0.

Pipeline for one image: downscale to ``max_side`` → image pyramid (``scales``) → dense
stride-16 feature map at each level (``layer``) → one candidate keypoint per feature-map cell,
located at the centre of that cell's receptive field → score every candidate (attention head if
one is given, otherwise the feature's L2 norm) → keep the top ``max_keypoints`` over all levels
(no NMS, as DELF; receptive-field centres of different levels never coincide, so there are
no exact duplicates to drop) → descriptors = L2-normalised raw features. PCA to 40-D is the
collection model's job (``services.space.whitening.LocalPCA``), not the extractor's.

Until an attention head is trained (``services.extractor.attention``), keypoints are scored by
feature L2 norm: a reasonable proxy for saliency on an ImageNet backbone, not a learned one.

Receptive-field centres: every convolution before the tap either has stride 1 and symmetric
"same" padding (no shift) or stride 2 with TensorFlow "SAME" padding, whose left/top padding
``total // 2`` depends on the input size at that layer (``_SamePadConv2d`` in the backbone).
Per axis, cell ``i`` of the tap is centred on input pixel ``offset + stride * i`` with
``offset = Σ_l S_l * ((k_l - 1) / 2 - pad_l)`` over the stride-2 convolutions ``l`` (kernel
``k_l``, left padding ``pad_l``, cumulative stride ``S_l`` before it); see
:func:`receptive_field_centres`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import NamedTuple

import cv2
import numpy as np
import torch
from torch import nn

from services.common.limits import MAX_LOCAL_FEATURES_PER_IMAGE
from services.extractor.backbone import BLOCK_SPECS, EfficientNetLite0, preprocess

__all__ = [
    "LocalConfig",
    "LocalFeatures",
    "LocalExtractor",
    "receptive_field_centres",
]

_STEM_KERNEL = 3
_TAP_RE = re.compile(r"^block(\d+)(\.expand)?$")
_SCORES = ("l2norm", "attention")


@dataclass(frozen=True)
class LocalConfig:
    """Local-feature extraction settings.

    Attributes
    ----------
    layer : str
        Backbone tap (``"block{i}"`` or ``"block{i}.expand"``) with output stride 16.
        Default ``"block10"``: the 112-channel output of the last stride-16 block. On the
        ROxford subset (8 cropped queries x 52 positives + ~100 negatives each, PCA-40, MNN,
        MAGSAC affine) it ranked positives by inliers at mAP 62.5 / AUC 0.85 against 52.3 /
        0.78 for the 672-channel ``"block11.expand"`` (same scales).
    scales : tuple of float
        Image-pyramid scale factors relative to the working image (after ``max_side``).
        Default one octave apart, (0.25, 0.5, 1.0): a 4x zoom range at 1.31x the cost of the
        full-size level alone; it beat (0.5, 0.7071, 1.0) (mAP 59.3, 1.75x the cost),
        (0.3536, 0.5, 0.7071, 1.0) (60.8) and (0.25, 0.3536, 0.5, 0.7071, 1.0) (56.1) in the
        same measurement. DELF's 7 scales 0.25..2.0 cost ~6x more and did not separate the
        phototourism pairs better (not run on ROxford).
    max_keypoints : int
        Keypoints kept per image (top by score over all scales), at most
        ``services.common.limits.MAX_LOCAL_FEATURES_PER_IMAGE``.
    score : {"l2norm", "attention"}
        Keypoint score; ``"attention"`` requires an attention head.
    max_side : int
        The input is first downscaled (never upscaled) so its longest side is at most this.
    """

    layer: str = "block10"
    scales: tuple[float, ...] = (0.25, 0.5, 1.0)
    max_keypoints: int = 1000
    score: str = "l2norm"
    max_side: int = 1024

    def __post_init__(self) -> None:
        if _TAP_RE.match(self.layer) is None:
            raise ValueError(f"layer must be 'block{{i}}' or 'block{{i}}.expand', got {self.layer!r}")
        _, stride = EfficientNetLite0.tap_spec(self.layer)  # raises ValueError on unknown taps
        if stride != 16:
            raise ValueError(f"layer must be a stride-16 tap, got {self.layer!r} (stride {stride})")
        if not self.scales or any(not (math.isfinite(s) and 0 < s <= 4) for s in self.scales):
            raise ValueError(f"scales must be a non-empty tuple of values in (0, 4], got {self.scales!r}")
        if len(set(self.scales)) != len(self.scales):
            raise ValueError(f"scales must be distinct, got {self.scales!r}")
        if not 1 <= self.max_keypoints <= MAX_LOCAL_FEATURES_PER_IMAGE:
            raise ValueError(f"max_keypoints must be in 1..{MAX_LOCAL_FEATURES_PER_IMAGE} (what a shard stores), got {self.max_keypoints!r}")
        if self.score not in _SCORES:
            raise ValueError(f"score must be one of {_SCORES}, got {self.score!r}")
        if self.max_side < 32:
            raise ValueError(f"max_side must be >= 32, got {self.max_side!r}")


class LocalFeatures(NamedTuple):
    """Local features of one image; unpacks as ``(keypoints, descriptors)``.

    Attributes
    ----------
    keypoints : np.ndarray
        ``(N, 4)`` float32 ``[x, y, scale, score]``: x, y in pixels of the image given to
        ``extract`` (pixel centres at integer coordinates), ``scale`` = size of the pyramid
        level relative to that image, ``score`` = attention or feature L2 norm.
        Sorted by decreasing score.
    descriptors : np.ndarray
        ``(N, C)`` float32 raw features, rows L2-normalised.
    """

    keypoints: np.ndarray
    descriptors: np.ndarray


def receptive_field_centres(layer: str, size: int) -> np.ndarray:
    """Input-pixel coordinates of the receptive-field centres of a tap along one axis.

    Parameters
    ----------
    layer : str
        Tap name, ``"block{i}"`` or ``"block{i}.expand"``.
    size : int
        Input length (pixels) along the axis.

    Returns
    -------
    np.ndarray
        ``(ceil(size / stride),)`` float64 centres, pixel centres at integer coordinates.
    """
    m = _TAP_RE.match(layer)
    if m is None:
        raise ValueError(f"layer must be 'block{{i}}' or 'block{{i}}.expand', got {layer!r}")
    i = int(m.group(1))
    n_blocks = i if m.group(2) else i + 1
    kernels = [_STEM_KERNEL] + [s.kernel for s in BLOCK_SPECS[:n_blocks] if s.stride == 2]
    offset, stride, n = 0.0, 1, size
    for k in kernels:  # the stride-2 convolutions, in order
        total = max((math.ceil(n / 2) - 1) * 2 + k - n, 0)
        offset += stride * ((k - 1) / 2 - total // 2)
        stride *= 2
        n = math.ceil(n / 2)
    return offset + stride * np.arange(n, dtype=np.float64)


def _resize(image: np.ndarray, scale: float) -> np.ndarray:
    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size == (w, h):
        return image
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, size, interpolation=interp)


class LocalExtractor:
    """Multi-scale DELF-style keypoints and descriptors.

    Parameters
    ----------
    backbone : EfficientNetLite0
        Frozen backbone (``load_backbone()``); used in inference mode only.
    config : LocalConfig
        Extraction settings.
    attention_head : nn.Module, optional
        ``(1, C, h, w) -> (1, 1, h, w)`` non-negative scores (``attention.AttentionHead``);
        required when ``config.score == "attention"`` and only then.
    """

    def __init__(
        self,
        backbone: EfficientNetLite0,
        config: LocalConfig = LocalConfig(),
        attention_head: nn.Module | None = None,
    ) -> None:
        if (config.score == "attention") != (attention_head is not None):
            raise ValueError(
                f"config.score={config.score!r} and attention_head="
                f"{'None' if attention_head is None else 'given'} disagree: an attention_head is "
                "required for score='attention' and unused otherwise"
            )
        if attention_head is not None:
            channels, _ = EfficientNetLite0.tap_spec(config.layer)
            head_channels = getattr(attention_head, "in_channels", channels)
            if head_channels != channels:
                raise ValueError(
                    f"attention head expects {head_channels} channels, layer {config.layer!r} "
                    f"has {channels}"
                )
            attention_head.eval()
        self.backbone = backbone
        self.config = config
        self.attention_head = attention_head

    @property
    def dim(self) -> int:
        """Descriptor dimension C (channels of ``config.layer``)."""
        return EfficientNetLite0.tap_spec(self.config.layer)[0]

    def _level(self, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense features ``(h*w, C)`` and scores ``(h*w,)`` of one pyramid level."""
        fmap = self.backbone.forward_taps(preprocess(image), [self.config.layer])[self.config.layer]
        if self.attention_head is not None:
            scores = self.attention_head(fmap)[0, 0].reshape(-1)
        else:
            scores = torch.linalg.vector_norm(fmap[0], dim=0).reshape(-1)
        feats = fmap[0].permute(1, 2, 0).reshape(-1, fmap.shape[1])
        return feats, scores

    @torch.inference_mode()
    def extract(self, image: np.ndarray) -> LocalFeatures:
        """Extract local features from one image.

        Parameters
        ----------
        image : np.ndarray
            ``(H, W, 3)`` uint8 RGB.

        Returns
        -------
        LocalFeatures
            ``keypoints (N, 4)``, ``descriptors (N, C)`` with ``N <= config.max_keypoints``.
        """
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
        cfg = self.config
        base = min(1.0, cfg.max_side / max(image.shape[:2]))
        working = _resize(image, base)
        feats, scores, xs, ys, level_scales = [], [], [], [], []
        for s in cfg.scales:
            level = _resize(working, s)
            h, w = level.shape[:2]
            f, sc = self._level(level)
            # level pixel → input pixel, pixel centres at integers, per-axis exact scale
            fx, fy = w / image.shape[1], h / image.shape[0]
            cx = (receptive_field_centres(cfg.layer, w) + 0.5) / fx - 0.5
            cy = (receptive_field_centres(cfg.layer, h) + 0.5) / fy - 0.5
            gy, gx = np.meshgrid(cy, cx, indexing="ij")
            feats.append(f)
            scores.append(sc)
            xs.append(gx.ravel())
            ys.append(gy.ravel())
            level_scales.append(np.full(gx.size, math.sqrt(fx * fy)))
        score = torch.cat(scores).numpy()
        keep = np.argsort(-score, kind="stable")[: cfg.max_keypoints]
        # gather descriptors level by level (concatenating whole maps would copy them all)
        bounds = np.cumsum([0] + [len(f) for f in feats])
        level_of = np.searchsorted(bounds, keep, side="right") - 1
        desc = torch.empty((len(keep), feats[0].shape[1]), dtype=feats[0].dtype)
        for lvl, f in enumerate(feats):
            rows = np.flatnonzero(level_of == lvl)
            desc[torch.from_numpy(rows)] = f[torch.from_numpy(keep[rows] - bounds[lvl])]
        desc = torch.nn.functional.normalize(desc, dim=1).numpy()
        x, y, lvl_scale = np.concatenate(xs), np.concatenate(ys), np.concatenate(level_scales)
        keypoints = np.stack([x[keep], y[keep], lvl_scale[keep], score[keep]], axis=1)
        return LocalFeatures(keypoints.astype(np.float32), desc.astype(np.float32, copy=False))
