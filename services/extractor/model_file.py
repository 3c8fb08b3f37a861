"""What a user-supplied weights file says beyond the backbone weights.

A file written by ``loupe train`` (``services.training.model.save_model``) carries ``meta``
(pooling, learned GeM p, output dim) and optionally a learned whitening ``head``; the serving
extractor applies them so the cluster serves the trained descriptor unchanged. A plain
backbone state dict has neither.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class TrainedHead:
    """Pooling settings and the learned whitening of a trained model file.

    Attributes
    ----------
    pooling : str
        "gem" or "rmac".
    gem_p : float
        Learned GeM exponent.
    weight : np.ndarray | None
        (D', 1280) whitening matrix; None without whitening.
    bias : np.ndarray | None
        (D',) whitening bias.
    """

    pooling: str
    gem_p: float
    weight: np.ndarray | None
    bias: np.ndarray | None

    def apply(self, x: np.ndarray) -> np.ndarray:
        """(n, 1280) L2-normalised descriptors → (n, D') whitened and L2-normalised."""
        if self.weight is None:
            return x
        y = x @ self.weight.T + self.bias
        return (y / np.maximum(np.linalg.norm(y, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


def read_trained_head(path: str) -> TrainedHead | None:
    """The trained head of a ``loupe train`` model file, or None for a plain weights file."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or "meta" not in obj or "pooling" not in obj["meta"]:
        return None
    meta = obj["meta"]
    head = obj.get("head")
    weight = head["whiten.weight"].numpy().astype(np.float32) if head else None
    bias = head["whiten.bias"].numpy().astype(np.float32) if head else None
    return TrainedHead(str(meta["pooling"]), float(meta.get("gem_p") or 3.0), weight, bias)
