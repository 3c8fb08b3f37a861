"""Conversion between ``ShardRecord`` messages and the shard's ``StoredImage``."""

from __future__ import annotations

import numpy as np

from loupe.tensors import from_tensor, is_empty, to_tensor
from loupe.v1 import shard_pb2, types_pb2
from services.common.errors import InvalidArgument
from services.common.limits import check_id, check_metadata, check_stored_shapes
from services.index.store import LocalStore, StoredImage


def _dims(tensor: types_pb2.Tensor, rank: int) -> list[int]:
    """The declared shape when it has ``rank`` dimensions, else [] (the decode names the error)."""
    return [int(x) for x in tensor.shape] if len(tensor.shape) == rank else []


def record_to_stored(rec: shard_pb2.ShardRecord, field: str) -> StoredImage:
    """Decode and validate one record; ``field`` names it in error messages.

    Every limit of ``services.common.limits`` that a stored image must respect is checked here,
    on the declared shapes before any tensor is decoded: id, metadata, dimension of the global
    vector, regional vectors and local features per image, finite values.
    """
    check_id(rec.id, f"{field}.id")
    check_metadata(rec.metadata, f"{field}.metadata")
    f = rec.features
    g, kp_t = f.__getattribute__("global"), f.local.keypoints
    check_stored_shapes(
        (_dims(g, 1) or [1])[0], (_dims(f.regional, 2) or [0])[0], (_dims(kp_t, 2) or [0])[0],
        (_dims(f.local.descriptors, 2) or [0, 1])[1], f"{field}.features",
    )
    vector = from_tensor(g, field=f"{field}.features.global")
    if vector.ndim != 1 or vector.shape[0] == 0:
        raise InvalidArgument(f"{field}.features.global: expected a non-empty (D,) vector, got shape {list(vector.shape)}")
    if not np.all(np.isfinite(vector)):
        raise InvalidArgument(f"{field}.features.global: non-finite values")
    regional = None
    if not is_empty(f.regional):
        regional = from_tensor(f.regional, field=f"{field}.features.regional")
        if regional.ndim != 2 or regional.shape[1] != vector.shape[0]:
            raise InvalidArgument(f"{field}.features.regional: expected (R, {vector.shape[0]}), got {list(regional.shape)}")
        if not np.all(np.isfinite(regional)):
            raise InvalidArgument(f"{field}.features.regional: non-finite values")
        regional = regional.astype(np.float16)
    local = None
    if not is_empty(kp_t):
        kp = from_tensor(kp_t, field=f"{field}.features.local.keypoints")
        desc = from_tensor(f.local.descriptors, field=f"{field}.features.local.descriptors")
        if kp.ndim != 2 or kp.shape[1] != 4 or desc.ndim != 2 or desc.shape[0] != kp.shape[0]:
            raise InvalidArgument(
                f"{field}.features.local: keypoints must be (N, 4) and descriptors (N, C), got "
                f"{list(kp.shape)} and {list(desc.shape)}"
            )
        if not (np.all(np.isfinite(kp)) and np.all(np.isfinite(desc))):
            raise InvalidArgument(f"{field}.features.local: non-finite values")
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
