"""Global image descriptors (GeM / R-MAC / MAC / SPoC) over the backbone's last conv map.

Multi-scale aggregation follows cirtorch's ``extract_ms``: each scale's pooled vector is
L2-normalised, then GeM combines scales as ``(mean_s v_s^p)^(1/p)`` (``msp = p``) while the
other poolings sum them; the result is L2-normalised. Descriptors are returned *before* any
whitening (the broker owns the learned PCA-whitening).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from services.extractor.backbone import NUM_FEATURES, EfficientNetLite0, preprocess
from services.extractor.pooling import gem, l2n, mac, regional_vectors, rmac, spoc

POOLINGS = ("gem", "rmac", "mac", "spoc")


@dataclass(frozen=True)
class GlobalConfig:
    """Global descriptor settings.

    Attributes
    ----------
    pooling : str
        One of ``"gem"``, ``"rmac"``, ``"mac"``, ``"spoc"``.
    gem_p : float
        GeM exponent (> 0), also the multi-scale exponent for GeM.
    scales : tuple of float
        Image scales in ``(0, 1]`` relative to the image after ``max_side`` capping.
    rmac_levels : int
        R-MAC levels ``L`` (>= 1), for ``pooling="rmac"`` and the regional vectors.
    max_side : int
        Longest image side (px) at scale 1; larger images are downscaled (>= 32).
    """

    pooling: str = "gem"
    gem_p: float = 3.0
    scales: tuple[float, ...] = (1.0, 1.0 / math.sqrt(2.0), 0.5)
    rmac_levels: int = 3
    max_side: int = 1024

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if not (math.isfinite(self.gem_p) and self.gem_p > 0):
            raise ValueError(f"gem_p must be a finite number > 0, got {self.gem_p!r}")
        scales = tuple(float(s) for s in self.scales)
        if not scales or not all(0.0 < s <= 1.0 for s in scales):
            raise ValueError(f"scales must be a non-empty tuple of values in (0, 1], got {self.scales!r}")
        object.__setattr__(self, "scales", scales)
        if not _is_int(self.rmac_levels) or self.rmac_levels < 1:
            raise ValueError(f"rmac_levels must be an integer >= 1, got {self.rmac_levels!r}")
        if not _is_int(self.max_side) or self.max_side < 32:
            raise ValueError(f"max_side must be an integer >= 32, got {self.max_side!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class GlobalFeatures:
    """Global descriptor of one image.

    Attributes
    ----------
    vector : ndarray ``(D,)`` float32
        L2-normalised global descriptor.
    regional : ndarray ``(R, D)`` float32
        L2-normalised R-MAC regional vectors at the largest scale (whole image first).
    """

    vector: np.ndarray
    regional: np.ndarray = field(repr=False)


def resize_max_side(image: np.ndarray, side: int) -> np.ndarray:
    """Downscale ``(H, W, 3)`` uint8 so that ``max(H, W) <= side`` (area interpolation).

    Images already small enough are returned as is; never upscales.
    """
    h, w = image.shape[:2]
    if max(h, w) <= side:
        return image
    s = side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


class GlobalExtractor:
    """Multi-scale global descriptors from a backbone's last conv map.

    Parameters
    ----------
    backbone : EfficientNetLite0
        Frozen backbone (its device is used for inference).
    config : GlobalConfig
    """

    def __init__(self, backbone: EfficientNetLite0, config: GlobalConfig | None = None) -> None:
        self.backbone = backbone
        self.config = config if config is not None else GlobalConfig()

    @property
    def dim(self) -> int:
        """Descriptor dimension ``D`` (1280)."""
        return NUM_FEATURES

    @torch.inference_mode()
    def extract(self, image: np.ndarray) -> GlobalFeatures:
        """Descriptor of one image.

        Parameters
        ----------
        image : ndarray ``(H, W, 3)`` uint8 RGB

        Returns
        -------
        GlobalFeatures
            ``vector (D,)`` (``config.pooling``, aggregated over ``config.scales``) and
            ``regional (R, D)`` (R-MAC regions at the largest scale), float32, L2-normalised.
        """
        cfg = self.config
        pool = self._pool_fn(cfg.pooling)
        per_scale, regional = [], None
        for is_largest, fmap in self._feature_maps(image):
            per_scale.append(l2n(pool(fmap)))
            if is_largest:
                regional = regional_vectors(fmap, cfg.rmac_levels)[0]
        assert regional is not None
        vector = self._aggregate(cfg.pooling, torch.cat(per_scale))
        return GlobalFeatures(vector=_np(vector), regional=_np(regional))

    def _pool_fn(self, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """``(1, C, h, w) -> (1, C)`` pooling by name."""
        cfg = self.config
        if name == "gem":
            return lambda x: gem(x, p=cfg.gem_p)
        if name == "rmac":
            return lambda x: rmac(x, L=cfg.rmac_levels)
        return {"mac": mac, "spoc": spoc}[name]

    def _aggregate(self, name: str, vecs: torch.Tensor) -> torch.Tensor:
        """Combine L2-normalised per-scale vectors ``(S, C) -> (C,)`` and L2-normalise."""
        if name == "gem":
            p = self.config.gem_p
            return l2n(vecs.pow(p).mean(dim=0).pow(1.0 / p))
        return l2n(vecs.sum(dim=0))

    def _feature_maps(self, image: np.ndarray) -> Iterator[tuple[bool, torch.Tensor]]:
        """Yield ``(is_largest_scale, (1, 1280, h, w))`` for each configured scale.

        Callers run it under ``torch.inference_mode()``.
        """
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape:
            raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
        cfg = self.config
        base = resize_max_side(image, cfg.max_side)
        h, w = base.shape[:2]
        largest = max(cfg.scales)
        device = next(self.backbone.parameters()).device
        for s in cfg.scales:
            # each level is resized from the given image (one resampling; and the same pixels as
            # the local-feature pyramid's level of that size, so a shared pass can serve both)
            scaled = base if s == 1.0 else resize_max_side(image, max(1, round(max(h, w) * s)))
            yield s == largest, self.backbone.forward_features(preprocess(scaled).to(device))


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float32).numpy()
