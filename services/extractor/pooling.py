"""Global pooling of convolutional feature maps: MAC, SPoC, GeM and R-MAC.

All functions are pure and take feature maps ``x`` of shape ``(B, C, H, W)`` (any memory
format). R-MAC follows Tolias et al., "Particular object retrieval with integral max-pooling
of CNN activations" (ICLR 2016), with the region grid of cirtorch's ``rmac`` / ``roipool``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

L2_EPS = 1e-6
RMAC_OVERLAP = 0.4
_RMAC_STEPS = (2.0, 3.0, 4.0, 5.0, 6.0, 7.0)  # candidate region counts on the long side


def l2n(x: torch.Tensor, dim: int = -1, eps: float = L2_EPS) -> torch.Tensor:
    """``x / (||x||_2 + eps)`` along ``dim`` (cirtorch's ``l2n``)."""
    return x / (torch.linalg.vector_norm(x, dim=dim, keepdim=True) + eps)


def mac(x: torch.Tensor) -> torch.Tensor:
    """Maximum activation of convolutions: ``(B, C, H, W) -> (B, C)``."""
    return x.amax(dim=(-2, -1))


def spoc(x: torch.Tensor) -> torch.Tensor:
    """Sum-pooled (here: average-pooled) convolutions: ``(B, C, H, W) -> (B, C)``."""
    return x.mean(dim=(-2, -1))


def gem(x: torch.Tensor, p: float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """Generalised mean pooling ``(mean(max(x, eps)^p))^(1/p)``: ``(B, C, H, W) -> (B, C)``.

    ``p = 1`` is SPoC, ``p -> inf`` approaches MAC.
    """
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def rmac_regions(H: int, W: int, L: int = 3) -> np.ndarray:
    """The R-MAC region grid on an ``H x W`` feature map, exactly as cirtorch computes it.

    The first region is the whole map; then for each level ``l = 1..L`` square regions of side
    ``floor(2 min(H, W) / (l + 1))`` are laid out uniformly, ``l`` along the short side and
    ``l + d`` along the long side, where ``d`` is chosen so that consecutive regions on the
    long side overlap by about 40%. A 24x32 map gives 1 + 2 + 6 + 12 = 21 regions.

    Parameters
    ----------
    H, W : int
        Feature map height and width (>= 1).
    L : int
        Number of levels (>= 1).

    Returns
    -------
    ndarray ``(R, 4)`` int64
        Regions as ``(x, y, w, h)`` in feature-map cells, all inside the map.
    """
    if H < 1 or W < 1 or L < 1:
        raise ValueError(f"rmac_regions needs H, W, L >= 1, got H={H}, W={W}, L={L}")
    w = min(H, W)
    # The same float32 torch expression as cirtorch, so that near-ties pick the same count.
    b = (max(H, W) - w) / (torch.tensor(_RMAC_STEPS) - 1)
    idx = int(torch.argmin(torch.abs(((w**2 - w * b) / w**2) - RMAC_OVERLAP)))
    wd = idx + 1 if H < W else 0
    hd = idx + 1 if H > W else 0

    regions = [(0, 0, W, H)]
    for level in range(1, L + 1):
        wl = math.floor(2 * w / (level + 1))
        if wl == 0:
            continue
        wl2 = math.floor(wl / 2 - 1)
        xs = _region_starts(W, wl, wl2, level + wd)
        ys = _region_starts(H, wl, wl2, level + hd)
        regions.extend((int(x), int(y), wl, wl) for y in ys for x in xs)
    return np.asarray(regions, dtype=np.int64)


def _region_starts(size: int, wl: int, wl2: int, n: int) -> np.ndarray:
    """``n`` region starts of side ``wl`` spread over ``size`` (cirtorch's ``cenW``/``cenH``)."""
    step = 0.0 if n == 1 else (size - wl) / (n - 1)
    return (torch.floor(wl2 + torch.arange(n, dtype=torch.float32) * step) - wl2).long().numpy()


def regional_vectors(x: torch.Tensor, L: int = 3) -> torch.Tensor:
    """Max-pooled R-MAC regions, each L2-normalised: ``(B, C, H, W) -> (B, R, C)``.

    Regions are those of :func:`rmac_regions` (whole map first).
    """
    regions = rmac_regions(x.shape[-2], x.shape[-1], L).tolist()
    if x.requires_grad and torch.is_grad_enabled():  # training: autograd through the regions
        vecs = [mac(x[..., y : y + h, x0 : x0 + w]) for x0, y, w, h in regions]
        return l2n(torch.stack(vecs, dim=1))
    # Serving: one channels-last copy, then each region's max runs over whole contiguous
    # C-vectors (5x faster than torch's amax over strided H x W windows of an NCHW map).
    hwc = np.ascontiguousarray(x.detach().float().cpu().numpy().transpose(0, 2, 3, 1))  # (B, H, W, C)
    out = np.stack([hwc[:, y : y + h, x0 : x0 + w].max(axis=(1, 2)) for x0, y, w, h in regions], axis=1)
    return l2n(torch.from_numpy(out).to(x.device))


def rmac(x: torch.Tensor, L: int = 3) -> torch.Tensor:
    """R-MAC: sum of the L2-normalised regional MACs, L2-normalised: ``(B, C, H, W) -> (B, C)``."""
    return l2n(regional_vectors(x, L).sum(dim=1))
