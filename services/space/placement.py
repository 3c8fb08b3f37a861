"""Stable placement of image ids on shards."""

from __future__ import annotations

import hashlib

PLACEMENT_VERSION = "blake2b64-mod-v1"
"""Name of the id → shard rule below; recorded in every data directory's layout file
(``services/space/layout.py``), so a rule change is a layout change, never a silent one."""


def shard_for(image_id: str, num_shards: int) -> int:
    """Shard index of ``image_id`` among ``num_shards``: first 8 bytes of its BLAKE2b digest mod S.

    Stable across processes, machines and Python versions (unlike ``hash()``).
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    digest = hashlib.blake2b(image_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % num_shards


REPLICA_STRIDE = 1 << 16
"""Registry member ids of shard replicas: ``shard + replica * REPLICA_STRIDE`` (replica 0 is the shard id)."""


def shard_member(shard: int, replica: int) -> int:
    """The registry member id of replica ``replica`` of shard ``shard`` (see ``REPLICA_STRIDE``)."""
    return shard + replica * REPLICA_STRIDE


def member_shard_replica(member: int) -> tuple[int, int]:
    """(shard, replica) of a registry member id made by ``shard_member``."""
    return member % REPLICA_STRIDE, member // REPLICA_STRIDE
