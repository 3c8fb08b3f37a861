"""Stored local features of verification candidates, and verifying a query against them.

Shared by the broker (which reads candidates' features with GetFeatures and verifies them
itself) and the shard (which verifies its own candidates in the ``Verify`` rpc): both decode a
candidate from the same ``ImageFeatures`` message and verify it with the same call, so a pair
gives the same inliers, model and matches wherever it runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from loupe.tensors import from_tensor, to_tensor
from loupe.v1 import shard_pb2, types_pb2
from services.common import limits
from services.common.errors import InvalidArgument, Unavailable
from services.rerank.verify import REFERENCE_SIDE_PX, VerifyParams, VerifyResult, verify_many, verify_pair


@dataclass(frozen=True)
class CandidateLocal:
    """Stored local features of one candidate and the longest side of its image (pixels)."""

    keypoints: np.ndarray  # (N, 4) float32
    descriptors: np.ndarray  # (N, C) float32, dequantised
    side: float


def side_of(width: int, height: int) -> float:
    """Longest side of a stored image (the reference side when the record has no size)."""
    return float(max(width, height)) or REFERENCE_SIDE_PX


def dequantised(codes: np.ndarray, scale: float) -> np.ndarray:
    """``(N, C)`` int8 codes → float32 descriptors, exactly as ``loupe.tensors.from_tensor``
    decodes an int8 ``Tensor`` whose (32-bit) scale is ``scale``."""
    return codes.astype(np.float32) * float(np.float32(scale))


def candidate_local(f: types_pb2.ImageFeatures) -> CandidateLocal | None:
    """A candidate's local features from its stored ``ImageFeatures`` (None when it has none)."""
    if not f.local.keypoints.shape:
        return None
    return CandidateLocal(
        from_tensor(f.local.keypoints, field="keypoints"),
        from_tensor(f.local.descriptors, field="descriptors"),
        side_of(f.width, f.height),
    )


def candidate_locals(features: Mapping[str, types_pb2.ImageFeatures]) -> dict[str, CandidateLocal]:
    """Stored local features of the candidates that have any (id → CandidateLocal)."""
    out = {}
    for image_id, f in features.items():
        c = candidate_local(f)
        if c is not None:
            out[image_id] = c
    return out


def verify_local(query: tuple[np.ndarray, np.ndarray], candidate: CandidateLocal, params: VerifyParams) -> VerifyResult:
    """Match and fit one candidate against the query's ``(keypoints (N, >=2), descriptors (N, C))``."""
    return verify_pair(query[0], query[1], candidate.keypoints, candidate.descriptors, params, candidate_side=candidate.side)


def verify_locals(query: tuple[np.ndarray, np.ndarray], candidates: list[CandidateLocal], params: VerifyParams) -> list[VerifyResult]:
    """:func:`verify_local` of each candidate, in the calling thread (the same results)."""
    return verify_many(query, [(c.keypoints, c.descriptors, c.side) for c in candidates], params)


# --- the shard Verify rpc's messages ----------------------------------------------------------

_PARAM_FIELDS = ("matcher", "ratio", "model", "estimator", "residual_px", "max_iters", "confidence", "min_inliers", "max_scale",
                 "max_anisotropy", "max_matches")


def params_to_proto(params: VerifyParams) -> shard_pb2.ShardVerifyParams:
    """``VerifyParams`` as sent to a shard (every field; floats as doubles, so nothing rounds)."""
    return shard_pb2.ShardVerifyParams(**{name: getattr(params, name) for name in _PARAM_FIELDS})


def params_from_proto(msg: shard_pb2.ShardVerifyParams, field: str = "params") -> VerifyParams:
    """The ``VerifyParams`` a shard verifies with; InvalidArgument naming ``field`` when out of range."""
    try:
        return VerifyParams(**{name: getattr(msg, name) for name in _PARAM_FIELDS})
    except ValueError as exc:
        raise InvalidArgument(f"{field}: {exc}") from None


def result_to_proto(image_id: str, result: VerifyResult, candidate: CandidateLocal) -> shard_pb2.VerifiedCandidate:
    """One candidate's outcome, with its inlier keypoints' x, y for drawing the matches."""
    out = shard_pb2.VerifiedCandidate(id=image_id, inliers=result.inliers)
    if result.model is not None:
        out.model.extend(np.asarray(result.model, dtype=np.float64).ravel().tolist())
        out.query_index.extend(result.inlier_pairs[:, 0].tolist())
        out.candidate_index.extend(result.inlier_pairs[:, 1].tolist())
        out.candidate_points.CopyFrom(to_tensor(candidate.keypoints[result.inlier_pairs[:, 1], :2].astype(np.float32)))
    return out


def result_from_proto(msg: shard_pb2.VerifiedCandidate, field: str = "results") -> tuple[VerifyResult, np.ndarray]:
    """``(VerifyResult, (I, 2) inlier points of the candidate)`` of a shard's answer."""
    pairs = np.stack([np.asarray(msg.query_index, np.int32), np.asarray(msg.candidate_index, np.int32)], axis=1).reshape(-1, 2)
    model = None
    if msg.model:
        model = np.asarray(msg.model, dtype=np.float64).reshape(2 if len(msg.model) == 6 else 3, 3)
    points = from_tensor(msg.candidate_points, field=f"{field}.candidate_points").reshape(-1, 2) if msg.candidate_points.shape else np.zeros((0, 2), np.float32)
    if len(pairs) != len(points) or len(pairs) != (msg.inliers if model is not None else 0):
        raise Unavailable(f"{field}: a shard answered {msg.inliers} inliers with {len(pairs)} matches and {len(points)} points")
    return VerifyResult(int(msg.inliers), pairs, model), points


def query_local_features(msg: types_pb2.LocalFeatures, field: str = "query") -> tuple[np.ndarray, np.ndarray]:
    """A query's local features sent to a shard, validated like stored ones (the limits of
    ``services.common.limits``, checked on the declared shapes before decoding; finite values):
    ``(keypoints (N, 4) float32, descriptors (N, C) float32)``."""
    kp_shape, desc_shape = list(msg.keypoints.shape), list(msg.descriptors.shape)
    if len(kp_shape) != 2 or kp_shape[1] != 4 or len(desc_shape) != 2 or desc_shape[0] != kp_shape[0]:
        raise InvalidArgument(f"{field}: keypoints must be (N, 4) and descriptors (N, C), got {kp_shape} and {desc_shape}")
    if kp_shape[0] > limits.MAX_LOCAL_FEATURES_PER_IMAGE:
        raise InvalidArgument(f"{field}.keypoints: {kp_shape[0]} keypoints, the limit is {limits.MAX_LOCAL_FEATURES_PER_IMAGE}")
    if not 1 <= desc_shape[1] <= limits.MAX_LOCAL_DESCRIPTOR_DIM:
        raise InvalidArgument(f"{field}.descriptors: dimension must be in 1..{limits.MAX_LOCAL_DESCRIPTOR_DIM}, got {desc_shape[1]}")
    kp = from_tensor(msg.keypoints, field=f"{field}.keypoints")
    desc = from_tensor(msg.descriptors, field=f"{field}.descriptors")
    if not (np.all(np.isfinite(kp)) and np.all(np.isfinite(desc))):
        raise InvalidArgument(f"{field}: non-finite values")
    return kp, desc


def query_local_to_proto(query: tuple[np.ndarray, np.ndarray]) -> types_pb2.LocalFeatures:
    """The broker's query local features as sent to the shards (float32, exact)."""
    return types_pb2.LocalFeatures(keypoints=to_tensor(np.asarray(query[0], np.float32)),
                                   descriptors=to_tensor(np.asarray(query[1], np.float32)))
