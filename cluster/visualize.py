"""``loupe search --show``: the query beside its top results, inlier matches drawn as lines."""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from loupe.tensors import from_tensor
from loupe.v1 import retrieval_pb2


def _working_scale(shape: tuple[int, ...], max_side: int) -> float:
    """Factor the extractor applied: images are shrunk (never enlarged) to ``max_side``."""
    return min(1.0, max_side / max(shape[:2]))


def render_matches(
    query: np.ndarray,
    results: Sequence[tuple[retrieval_pb2.SearchResult, np.ndarray | None]],
    *,
    crop: Sequence[float] | None = None,
    max_side: int = 1024,
    height: int = 360,
    max_lines: int = 40,
) -> np.ndarray:
    """Compose ``(H, W, 3)`` RGB: the query, then each result, with inlier lines between them.

    Parameters
    ----------
    query : (H, W, 3) uint8
        The query image as given to ``loupe search`` (before crop).
    results : sequence of (SearchResult, image or None)
        Results with their images (None when the file is not available here: a grey tile).
    crop : (x1, y1, x2, y2) or None
        The query crop, in query pixels.
    max_side : int
        The extractor's working size: keypoints are in pixels of images shrunk to it.
    max_lines : int
        Inlier lines drawn per result (an even subsample), so the picture stays readable.
    """
    x0, y0 = 0.0, 0.0
    q = query
    if crop is not None:
        x0, y0 = max(0, int(crop[0])), max(0, int(crop[1]))
        q = query[y0 : int(crop[3]), x0 : int(crop[2])]
    q_scale = _working_scale(q.shape, max_side)
    tiles, offsets, scales = [], [], []
    s_q = height / q.shape[0]
    tiles.append(cv2.resize(q, (max(1, int(q.shape[1] * s_q)), height)))
    x = tiles[0].shape[1]
    for res, img in results:
        if img is None:
            img = np.full((height, height, 3), 128, np.uint8)
        s = height / img.shape[0]
        tile = cv2.resize(img, (max(1, int(img.shape[1] * s)), height))
        cv2.putText(tile, f"{res.id} inl={res.stages.inliers}", (5, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 0), 1, cv2.LINE_AA)
        tiles.append(tile)
        offsets.append(x)
        scales.append(s / _working_scale(img.shape, max_side))
        x += tile.shape[1]
    canvas = np.concatenate(tiles, axis=1)
    rng = np.random.default_rng(0)
    for (res, _img), off, s_r in zip(results, offsets, scales):
        if not res.matches.query_points.shape:
            continue
        qp = from_tensor(res.matches.query_points, field="query_points") / q_scale * s_q
        rp = from_tensor(res.matches.result_points, field="result_points") * s_r
        keep = np.linspace(0, len(qp) - 1, min(len(qp), max_lines)).astype(int) if len(qp) else []
        for (qx, qy), (rx, ry) in zip(qp[keep], rp[keep]):
            color = tuple(int(c) for c in rng.integers(64, 256, 3))
            cv2.line(canvas, (int(qx), int(qy)), (int(rx + off), int(ry)), color, 1, cv2.LINE_AA)
    return canvas
