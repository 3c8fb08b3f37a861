"""RootSIFT (Arandjelović & Zisserman, CVPR 2012): the classical peer for benchmarking only.

OpenCV SIFT keypoints → RootSIFT descriptors (L1-normalise, element-wise square root, hence
unit L2 norm), so they plug into ``services.rerank.verify`` unchanged; pair them with the
ratio test (``VerifyParams(matcher="ratio", ratio=ROOTSIFT_RATIO)``).
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["ROOTSIFT_RATIO", "extract_rootsift"]

ROOTSIFT_RATIO = 0.8
"""Lowe's ratio-test threshold usually paired with (Root)SIFT."""


def extract_rootsift(
    image: np.ndarray, *, n_features: int = 1000, max_side: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Detect SIFT keypoints and compute RootSIFT descriptors.

    Parameters
    ----------
    image : np.ndarray
        ``(H, W, 3)`` uint8 RGB image.
    n_features : int
        Keep at most this many keypoints (strongest by response).
    max_side : int
        The image is downscaled so its longest side is at most this (never upscaled).

    Returns
    -------
    keypoints : np.ndarray
        ``(N, 4)`` float32 ``[x, y, size, response]``, x, y in pixels of ``image``.
    descriptors : np.ndarray
        ``(N, 128)`` float32, rows with unit L2 norm.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if n_features < 1:
        raise ValueError(f"n_features must be >= 1, got {n_features!r}")
    if max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side!r}")
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    scale = min(1.0, max_side / max(gray.shape))
    if scale < 1.0:
        size = (round(gray.shape[1] * scale), round(gray.shape[0] * scale))
        gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
    kps, desc = cv2.SIFT_create(nfeatures=n_features).detectAndCompute(gray, None)
    if desc is None or len(kps) == 0:
        return np.zeros((0, 4), np.float32), np.zeros((0, 128), np.float32)
    # SIFT may return a few more than n_features (ties, duplicated orientations)
    order = np.argsort([-k.response for k in kps], kind="stable")[:n_features]
    kps, desc = [kps[i] for i in order], desc[order]
    keypoints = np.array(
        [(k.pt[0] / scale, k.pt[1] / scale, k.size / scale, k.response) for k in kps],
        dtype=np.float32,
    )
    desc = desc.astype(np.float32)
    desc /= np.maximum(desc.sum(axis=1, keepdims=True), 1e-12)
    return keypoints, np.sqrt(desc)
