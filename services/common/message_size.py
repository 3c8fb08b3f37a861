"""How much a response may hold under the gRPC message limit, derived from the write limits.

Every answer that grows with stored data (shard searches, GetFeatures, GetInfo, ListIds,
ListVectors; the broker's SearchBatch) is sized here from the worst case that the limits of
``services.common.limits`` allow for one item (one hit, one image), never from the data it
happens to hold today: a request either fits by construction, is split or shrunk to fit, or is
refused up front with INVALID_ARGUMENT naming the limit. The sizes are protobuf wire sizes
(field tag, length prefix, payload), so they are upper bounds of ``ByteSize()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from services.common import limits
from services.common.errors import InvalidArgument

RESERVE_BYTES = 1 * limits.MiB
"""Kept free of items in every message: fixed fields, tensor headers, timings, per-query wrappers."""
TENSOR_HEADER_BYTES = 64
"""Shape, dtype and scale fields of one ``Tensor`` and its field prefix."""


def varint_bytes(n: int) -> int:
    """Bytes of ``n`` (>= 0) as a protobuf varint."""
    return max(1, (n.bit_length() + 6) // 7)


def field_bytes(payload: int) -> int:
    """Bytes of one length-delimited field (tag < 16) whose payload is ``payload`` bytes."""
    return 1 + varint_bytes(payload) + payload


def _metadata_map_bytes() -> int:
    """Largest ``map<string, string>`` the metadata limits allow (its entries, unwrapped):
    the key/value bytes plus, per entry, the entry's tag and length and the key's and value's."""
    longest_entry = field_bytes(limits.MAX_METADATA_KEY_BYTES) + field_bytes(limits.MAX_METADATA_VALUE_BYTES)
    per_entry_overhead = field_bytes(longest_entry) - limits.MAX_METADATA_KEY_BYTES - limits.MAX_METADATA_VALUE_BYTES
    return limits.MAX_METADATA_BYTES + limits.MAX_METADATA_ENTRIES * per_entry_overhead


METADATA_BYTES = _metadata_map_bytes()
"""Worst-case metadata of one image on the wire (4 KiB of keys and values + framing)."""
ID_BYTES = field_bytes(limits.MAX_ID_BYTES)
"""Worst-case id field."""


def tensor_bytes(values: int, itemsize: int) -> int:
    """A ``Tensor`` field of ``values`` items of ``itemsize`` bytes."""
    return field_bytes(values * itemsize + TENSOR_HEADER_BYTES)


def shard_hit_bytes(vector_dim: int = 0) -> int:
    """One hit of a shard's ``ShardSearchResponse``: id, score, metadata and, when vectors are
    returned, its (vector_dim,) float32 row (0 = no vectors)."""
    return ID_BYTES + 4 + field_bytes(METADATA_BYTES) + 4 * vector_dim


def result_bytes(with_matches: bool = False) -> int:
    """One public ``SearchResult``: id, scores, verification, metadata, shard id and, with
    ``return_matches``, two (I, 2) float32 point tensors of at most one match per local feature."""
    scalars = 5 + field_bytes(3 * 6) + 2 + 5 + 6  # score, stages, verified, confidence, shard_id
    n = ID_BYTES + scalars + METADATA_BYTES
    if with_matches:
        n += field_bytes(2 * tensor_bytes(2 * limits.MAX_LOCAL_FEATURES_PER_IMAGE, 4))
    return field_bytes(n)


def info_bytes(vector_dim: int = 0) -> int:
    """One ``ShardImageInfo`` / public ``StoredImage``: id, metadata, size, shard id and, when
    asked, the (vector_dim,) float32 raw vector."""
    n = ID_BYTES + METADATA_BYTES + 3 * 6
    if vector_dim:
        n += tensor_bytes(vector_dim, 4)
    return field_bytes(n)


def features_bytes(dim: int, *, want_global: bool, want_regional: bool, want_local: bool) -> int:
    """One image of a ``GetFeaturesResponse`` (its id and ``ImageFeatures``) at global dimension
    ``dim``: float32 global, float16 regional (at most MAX_REGIONS_PER_IMAGE rows), float16
    keypoints (N, 4) and int8 descriptors (N, C) at the local-feature limits."""
    n = 2 * 6
    if want_global:
        n += tensor_bytes(dim, 4)
    if want_regional:
        n += tensor_bytes(limits.MAX_REGIONS_PER_IMAGE * dim, 2)
    if want_local:
        kp = limits.MAX_LOCAL_FEATURES_PER_IMAGE
        n += field_bytes(tensor_bytes(kp * 4, 2) + tensor_bytes(kp * limits.MAX_LOCAL_DESCRIPTOR_DIM, 1))
    return ID_BYTES + field_bytes(n)


def verified_candidate_bytes() -> int:
    """One ``VerifiedCandidate`` of a shard's ``VerifyResponse``: id, inliers, a 3x3 model and, at
    the local-feature limit, one inlier per query keypoint: two packed int32 indices (up to 5 bytes
    each as varints) and a float32 (x, y)."""
    inliers = limits.MAX_LOCAL_FEATURES_PER_IMAGE
    n = ID_BYTES + 6 + field_bytes(9 * 8) + 2 * field_bytes(5 * inliers) + tensor_bytes(2 * inliers, 4)
    return field_bytes(n)


def vector_row_bytes(dim: int, regional: bool) -> int:
    """One image of a ``ListVectorsResponse``: id, (dim,) float32 vector and, when asked, its
    regional vectors as float32 rows and their count."""
    n = ID_BYTES + 4 * dim
    if regional:
        n += limits.MAX_REGIONS_PER_IMAGE * 4 * dim + 5
    return n


def version_entry_bytes() -> int:
    """One entry of a ``ListVersionsResponse``: id, version (varint) and deleted flag."""
    return ID_BYTES + 11 + 2


@dataclass(frozen=True)
class MessageBudget:
    """The bytes items may take in one message of a server whose limit is ``max_message_bytes``."""

    max_message_bytes: int = limits.MAX_MESSAGE_BYTES

    @property
    def bytes(self) -> int:
        return self.max_message_bytes - RESERVE_BYTES

    def describe(self) -> str:
        """The limit as messages name it, e.g. "the 64 MiB message limit"."""
        mib = self.max_message_bytes / limits.MiB
        return f"the {mib:g} MiB message limit"

    def items(self, per_item: int) -> int:
        """How many items of ``per_item`` bytes fit (at least 1: a single item always fits,
        the limits being far below any usable message size)."""
        return max(1, self.bytes // per_item)

    def check(self, count: int, per_item: int, field: str, what: str) -> None:
        """InvalidArgument naming ``field`` when ``count`` items of ``per_item`` bytes do not fit."""
        if count * per_item > self.bytes:
            raise InvalidArgument(
                f"{field}: {count} {what} of up to {per_item} bytes each exceed {self.describe()}: "
                f"at most {self.items(per_item)} per call"
            )

    def split(self, costs: Sequence[int]) -> list[list[int]]:
        """Positions of ``costs`` cut, in order, into consecutive groups whose costs sum within
        the budget (an item costing more than the budget alone gets a group of its own)."""
        groups: list[list[int]] = []
        total = 0
        for i, cost in enumerate(costs):
            if not groups or total + cost > self.bytes:
                groups.append([])
                total = 0
            groups[-1].append(i)
            total += cost
        return groups
