"""Trainable retrieval network: EfficientNet-Lite0 -> GeM / R-MAC -> L2 -> whitening -> L2.

The layout follows cirtorch's ``ImageRetrievalNet``: the pooled descriptor is L2-normalised,
passed through a learned whitening layer (an ``nn.Linear`` initialised from a
:class:`~services.space.whitening.PCAWhitening` fitted on pooled descriptors of the
training images) and L2-normalised again.

Model file (:func:`save_model`; served by ``services.extractor.model_file``), a dict loadable with
``torch.load(path, weights_only=True)``::

    {
      "state_dict": {...},   # the backbone's own state dict, weight-file key layout
                             # ("_conv_stem.weight", "_blocks.15._bn2.bias", ..., "_fc.bias"),
                             # so services.extractor.backbone.load_backbone(path) loads it as is
      "head": {              # present iff meta["whitening"]
        "whiten.weight": Tensor (dim, 1280),   # y = whiten.weight @ x + whiten.bias
        "whiten.bias":   Tensor (dim,),
      },
      "meta": {
        "backbone": "efficientnet-lite0",
        "pooling": "gem" | "rmac",   # over the (B, 1280, H/32, W/32) head map
        "gem_p": float | None,       # learned GeM exponent (None for rmac)
        "rmac_levels": int,          # R-MAC scales L (used only for rmac)
        "dim": int,                  # output dimension (1280 without whitening)
        "mean": [0.5, 0.5, 0.5],     # input normalisation on [0, 1] RGB: (x - mean) / std,
        "std": [0.5, 0.5, 0.5],      #   i.e. x_uint8 / 127.5 - 1, as backbone.preprocess does
        "whitening": bool,           # whether "head" holds a whitening layer
        ...                          # extra entries given by the caller (e.g. training config)
      },
    }

The descriptor of an image is ``l2(whiten(l2(pool(features(x)))))``, or ``l2(pool(...))``
without whitening.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from services.extractor.backbone import (
    BACKBONE_NAME,
    BLOCK_SPECS,
    NUM_FEATURES,
    EfficientNetLite0,
)
from services.extractor.pooling import gem, rmac
from services.space.whitening import PCAWhitening

POOLINGS = ("gem", "rmac")
INPUT_MEAN = (0.5, 0.5, 0.5)
INPUT_STD = (0.5, 0.5, 0.5)
_META_KEYS = ("backbone", "pooling", "gem_p", "rmac_levels", "dim", "mean", "std", "whitening")


class RetrievalNet(nn.Module):
    """Backbone + pooling + optional learned whitening, producing L2-normalised descriptors.

    Trainable: the last ``train_blocks`` MBConv blocks, the backbone's 1x1 head conv and its
    BatchNorm affine parameters, the GeM exponent and the whitening layer; the rest of the
    backbone is frozen. Every BatchNorm stays in eval mode (running statistics are never
    updated, as in cirtorch), so small CPU batches are safe.

    Parameters
    ----------
    backbone : EfficientNetLite0
        From :func:`services.extractor.backbone.load_backbone`.
    pooling : {"gem", "rmac"}
    gem_p : float
        Initial GeM exponent (learned).
    rmac_levels : int
        R-MAC scales ``L``.
    whitening_dim : int or None
        Output dimension of the whitening layer; ``None`` for no whitening (``dim = 1280``).
        The layer starts with ``nn.Linear``'s random initialisation; call
        :meth:`init_whitening` before training.
    train_blocks : int
        How many of the last MBConv blocks (of 16) to train, ``0..16``.
    """

    def __init__(
        self,
        backbone: EfficientNetLite0,
        pooling: str = "gem",
        gem_p: float = 3.0,
        rmac_levels: int = 3,
        whitening_dim: int | None = None,
        train_blocks: int = 2,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if not 0 <= train_blocks <= len(BLOCK_SPECS):
            raise ValueError(f"train_blocks must be in 0..{len(BLOCK_SPECS)}, got {train_blocks}")
        if whitening_dim is not None and not 1 <= whitening_dim <= NUM_FEATURES:
            raise ValueError(f"whitening dim must be in 1..{NUM_FEATURES}, got {whitening_dim}")
        self.backbone = backbone
        self.pooling = pooling
        self.rmac_levels = rmac_levels
        self.p = nn.Parameter(torch.tensor(float(gem_p))) if pooling == "gem" else None
        self.whiten = nn.Linear(NUM_FEATURES, whitening_dim) if whitening_dim is not None else None
        self._set_trainable(train_blocks)

    @property
    def dim(self) -> int:
        """Descriptor dimension."""
        return self.whiten.out_features if self.whiten is not None else NUM_FEATURES

    def _set_trainable(self, train_blocks: int) -> None:
        first = len(BLOCK_SPECS) - train_blocks
        trainable = tuple(f"_blocks.{i}." for i in range(first, len(BLOCK_SPECS)))
        trainable += ("_conv_head.", "_bn1.")
        # freeze() also keeps every BatchNorm in eval mode under train().
        self.backbone.freeze()
        for name, param in self.backbone.named_parameters():
            param.requires_grad_(name.startswith(trainable))

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised pooled descriptor before whitening: ``(B, 3, H, W) -> (B, 1280)``."""
        fmap = self.backbone.forward_features(x)
        v = gem(fmap, self.p) if self.p is not None else rmac(fmap, self.rmac_levels)
        return F.normalize(v, dim=1)

    def forward(self, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Descriptors: ``(B, 3, H, W) -> (B, dim)``.

        ``normalize=False`` returns the whitened vectors before the final L2 normalisation
        (the N-pair loss wants unnormalised embeddings).
        """
        v = self.pool(x)
        if self.whiten is None:
            return v
        v = self.whiten(v)
        return F.normalize(v, dim=1) if normalize else v

    @torch.no_grad()
    def init_whitening(self, whitening: PCAWhitening) -> None:
        """Set the whitening layer to a fitted PCA whitening.

        With ``W = diag(scale) @ components`` (``(dim, 1280)``), ``y = W (x - mean)``, so the
        layer's weight is ``W`` and its bias ``-W mean``; followed by the L2 normalisation of
        :meth:`forward` this is exactly ``whitening.apply``.
        """
        if self.whiten is None:
            raise ValueError("this model has no whitening layer")
        if whitening.output_dim != self.dim or whitening.input_dim != NUM_FEATURES:
            raise ValueError(
                f"whitening maps {whitening.input_dim} -> {whitening.output_dim}, the layer "
                f"needs {NUM_FEATURES} -> {self.dim}"
            )
        scale = torch.as_tensor(whitening.scale, dtype=torch.float32)
        proj = scale[:, None] * torch.as_tensor(whitening.components, dtype=torch.float32)
        mean = torch.as_tensor(whitening.mean, dtype=torch.float32)
        self.whiten.weight.copy_(proj)
        self.whiten.bias.copy_(-(proj @ mean))

    def meta(self) -> dict[str, Any]:
        """The model-file ``meta`` entries describing this network (see the module docstring)."""
        return {
            "backbone": BACKBONE_NAME,
            "pooling": self.pooling,
            "gem_p": float(self.p.detach()) if self.p is not None else None,
            "rmac_levels": self.rmac_levels,
            "dim": self.dim,
            "mean": list(INPUT_MEAN),
            "std": list(INPUT_STD),
            "whitening": self.whiten is not None,
        }


def images_to_batch(images: Sequence[np.ndarray]) -> torch.Tensor:
    """Stack same-size uint8 RGB images into a normalised batch (as ``backbone.preprocess``).

    ``B x (H, W, 3) uint8 -> (B, 3, H, W)`` float32 in ``[-1, 1]``, channels_last.
    """
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    x = x.to(torch.float32).mul_(1.0 / 127.5).sub_(1.0)
    return x.contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def describe_images(
    model: RetrievalNet,
    images: Sequence[np.ndarray],
    device: torch.device | str = "cpu",
    *,
    whiten: bool = True,
    batch: int = 16,
) -> np.ndarray:
    """Descriptors of images at their given size, batching images of equal size.

    Parameters
    ----------
    model : RetrievalNet
        Used in eval mode; its training mode is restored afterwards.
    images : sequence of ndarray ``(H_i, W_i, 3)`` uint8
    device : torch device
        Where ``model`` lives.
    whiten : bool
        ``False`` returns the pooled descriptors before whitening ``(N, 1280)``.
    batch : int
        Maximum images per forward pass.

    Returns
    -------
    ndarray ``(N, dim)`` float32
        L2-normalised rows, in input order.
    """
    was_training = model.training
    model.eval()
    out = np.zeros((len(images), model.dim if whiten else NUM_FEATURES), dtype=np.float32)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, img in enumerate(images):
        by_shape.setdefault(img.shape, []).append(i)
    for idx in by_shape.values():
        for start in range(0, len(idx), batch):
            chunk = idx[start : start + batch]
            x = images_to_batch([images[i] for i in chunk]).to(device)
            v = model(x) if whiten else model.pool(x)
            out[chunk] = v.cpu().numpy()
    model.train(was_training)
    return out


def save_model(path: str | Path, model: RetrievalNet, meta: Mapping[str, Any] | None = None) -> None:
    """Write the model file described in the module docstring.

    Parameters
    ----------
    path : str or Path
    model : RetrievalNet
    meta : mapping, optional
        Extra ``meta`` entries (plain Python values: str, int, float, bool, None, lists and
        dicts of those); they may not override the model's own keys.
    """
    extra = dict(meta or {})
    clash = sorted(set(extra) & set(_META_KEYS))
    if clash:
        raise ValueError(f"meta may not override the model's own keys {clash}")
    obj: dict[str, Any] = {
        "state_dict": {k: v.detach().cpu() for k, v in model.backbone.state_dict().items()},
        "meta": {**model.meta(), **extra},
    }
    if model.whiten is not None:
        obj["head"] = {
            "whiten.weight": model.whiten.weight.detach().cpu().clone(),
            "whiten.bias": model.whiten.bias.detach().cpu().clone(),
        }
    torch.save(obj, path)
