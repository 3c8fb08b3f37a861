"""Conversion between ``ShardRecord`` messages and the shard's ``StoredImage``."""

from __future__ import annotations

import numpy as np

from loupe.tensors import from_tensor, is_empty, to_tensor
from loupe.v1 import shard_pb2, types_pb2
from services.common.errors import InvalidArgument
from services.common.limits import check_id
from services.index.store import LocalStore, StoredImage

def record_to_stored(rec: shard_pb2.ShardRecord, field: str) -> StoredImage:
    """Decode and validate one record; ``field`` names it in error messages."""
    check_id(rec.id, f"{field}.id")
    f = rec.features
    vector = from_tensor(f.__getattribute__("global"), field=f"{field}.features.global")
    if vector.ndim != 1 or vector.shape[0] == 0:
        raise InvalidArgument(f"{field}.features.global: expected a non-empty (D,) vector, got shape {list(vector.shape)}")
    if not np.all(np.isfinite(vector)):
        raise InvalidArgument(f"{field}.features.global: non-finite values")
    regional = None
    if not is_empty(f.regional):
        regional = from_tensor(f.regional, field=f"{field}.features.regional")
        if regional.ndim != 2 or regional.shape[1] != vector.shape[0]:
            raise InvalidArgument(f"{field}.features.regional: expected (R, {vector.shape[0]}), got {list(regional.shape)}")
        regional = regional.astype(np.float16)
    local = None
    if not is_empty(f.local.keypoints):
        kp = from_tensor(f.local.keypoints, field=f"{field}.features.local.keypoints")
        desc = from_tensor(f.local.descriptors, field=f"{field}.features.local.descriptors")
        if kp.ndim != 2 or kp.shape[1] != 4 or desc.ndim != 2 or desc.shape[0] != kp.shape[0]:
            raise InvalidArgument(
                f"{field}.features.local: keypoints must be (N, 4) and descriptors (N, C), got "
                f"{list(kp.shape)} and {list(desc.shape)}"
            )
        local = LocalStore.quantize(kp, desc)
    return StoredImage(rec.id, vector.astype(np.float32), regional, local, dict(rec.metadata), int(f.width), int(f.height))


def stored_to_features(
    img: StoredImage, *, global_vec: np.ndarray | None, regional: np.ndarray | None, local: bool
) -> types_pb2.ImageFeatures:
    """Build the ImageFeatures message the broker asked for (vectors already transformed)."""
    out = types_pb2.ImageFeatures(width=img.width, height=img.height)
    if global_vec is not None:
        out.__getattribute__("global").CopyFrom(to_tensor(global_vec.astype(np.float32)))
    if regional is not None:
        out.regional.CopyFrom(to_tensor(regional.astype(np.float16)))
    if local and img.local is not None:
        out.local.keypoints.CopyFrom(to_tensor(img.local.keypoints))
        out.local.descriptors.CopyFrom(to_tensor(img.local.descriptors, scale=img.local.scale))
    return out
