"""Stable placement of image ids on shards: which shard owns an id, under which rule.

Two rules, named in every data directory's layout file (``services/space/layout.py``):

- ``"buckets4096-hrw-v2"`` (``PLACEMENT_VERSION``, new collections): an id falls in one of
  ``BUCKETS`` fixed virtual buckets (first 8 bytes of its BLAKE2b digest mod 4096); each bucket
  belongs to the shard of highest rendezvous weight ``blake2b(bucket, shard)`` among shards
  ``0..S-1``. Adding shard S moves only the buckets whose weight for S beats every other (about
  1/(S+1) of them, all onto S); removing the last shard moves only that shard's buckets, each to
  the shard it had before that shard was added.
- ``"blake2b64-mod-v1"`` (``LEGACY_PLACEMENT``, collections written before resharding existed):
  digest mod S; changing S moves almost every id. Kept so those data directories keep working;
  ``loupe reshard`` to the same shard count migrates one to the bucket rule.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field

PLACEMENT_VERSION = "buckets4096-hrw-v2"
"""The rule new collections are written with."""
LEGACY_PLACEMENT = "blake2b64-mod-v1"
"""The rule of collections written before the bucket rule (digest mod shard count)."""
PLACEMENTS = (PLACEMENT_VERSION, LEGACY_PLACEMENT)
"""Every rule this build can place ids with."""
BUCKETS = 4096
"""Virtual buckets of the bucket rule (fixed for the life of a collection: part of its name)."""
MAX_SHARDS = 1024
"""Most shards a collection may have (``REPLICA_STRIDE`` leaves room for far more)."""


def _digest64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def shard_for(image_id: str, num_shards: int) -> int:
    """Shard of ``image_id`` among ``num_shards`` under the legacy rule: first 8 bytes of its
    BLAKE2b digest mod S. Stable across processes, machines and Python versions (unlike ``hash()``)."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    return _digest64(image_id.encode("utf-8")) % num_shards


def bucket_of(image_id: str) -> int:
    """Virtual bucket (0..BUCKETS-1) of ``image_id``."""
    return _digest64(image_id.encode("utf-8")) % BUCKETS


@functools.lru_cache(maxsize=64)
def bucket_owners(num_shards: int) -> tuple[int, ...]:
    """Shard of every bucket (index = bucket) among ``num_shards``: highest rendezvous weight
    (computed once per count: ~10 ms per shard)."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    return tuple(max(range(num_shards), key=lambda s: (_digest64(b"%d/%d" % (b, s)), s)) for b in range(BUCKETS))


@dataclass(frozen=True)
class Placement:
    """Which shard owns an id: ``rule`` (one of ``PLACEMENTS``) over ``shards`` shards.

    The one place the broker's reads, writes, searches, restores and reshards ask."""

    shards: int
    rule: str = PLACEMENT_VERSION
    _table: tuple[int, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 1 <= self.shards <= MAX_SHARDS:
            raise ValueError(f"shards: must be 1..{MAX_SHARDS}, got {self.shards}")
        if self.rule not in PLACEMENTS:
            raise ValueError(f"placement: unknown rule {self.rule!r} (this build knows {', '.join(PLACEMENTS)})")
        if self.rule == PLACEMENT_VERSION:
            object.__setattr__(self, "_table", bucket_owners(self.shards))

    def shard_of(self, image_id: str) -> int:
        """The shard (0..shards-1) that owns ``image_id``."""
        if self.rule == LEGACY_PLACEMENT:
            return shard_for(image_id, self.shards)
        return self._table[bucket_of(image_id)]


REPLICA_STRIDE = 1 << 16
"""Registry member ids of shard replicas: ``shard + replica * REPLICA_STRIDE`` (replica 0 is the shard id)."""


def shard_member(shard: int, replica: int) -> int:
    """The registry member id of replica ``replica`` of shard ``shard`` (see ``REPLICA_STRIDE``)."""
    return shard + replica * REPLICA_STRIDE


def member_shard_replica(member: int) -> tuple[int, int]:
    """(shard, replica) of a registry member id made by ``shard_member``."""
    return member % REPLICA_STRIDE, member // REPLICA_STRIDE
