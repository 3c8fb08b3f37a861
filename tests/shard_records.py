"""Shard records for tests that write a shard directly (its internal port, a backup, a fake shard)."""

from __future__ import annotations

import numpy as np

from loupe.tensors import to_tensor
from loupe.v1 import shard_pb2, types_pb2


def unit_vector(rng: np.random.Generator, dim: int) -> np.ndarray:
    """A random unit vector ``(dim,)`` float32."""
    v = rng.standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def shard_record(
    image_id: str, vector: np.ndarray, *, keypoints: int = 0, metadata: dict[str, str] | None = None,
    version: int = 0, width: int = 64, height: int = 64,
) -> shard_pb2.ShardRecord:
    """One record: the global ``vector`` ``(D,)`` and, with ``keypoints`` > 0, that many local
    features (zero keypoints, 128-D float16 descriptors: ~256 bytes each)."""
    feats = types_pb2.ImageFeatures(width=width, height=height)
    feats.__getattribute__("global").CopyFrom(to_tensor(np.asarray(vector, np.float32)))
    if keypoints:
        feats.local.keypoints.CopyFrom(to_tensor(np.zeros((keypoints, 4), np.float32)))
        feats.local.descriptors.CopyFrom(to_tensor(np.ones((keypoints, 128), np.float16)))
    return shard_pb2.ShardRecord(id=image_id, features=feats, metadata=metadata or {}, version=version)
