"""Chunk files: a shard's live records in id order, cut into files of a few MB.

Format: a sequence of ``loupe.v1.ShardRecord`` messages (id, features, metadata, version), each
preceded by its length as a protobuf varint — the "length-delimited" framing of protobuf streams,
readable from any language with the shard.proto. A chunk file is named by the SHA-256 of its bytes
(``chunks/<sha256>``), so equal chunks are stored once, whichever backup wrote them.

Where a shard's id list is cut into chunks depends only on the ids: a chunk ends after an id whose
keyed hash is 0 modulo ``ids_per_cut`` (content-defined chunking on ids; about ``ids_per_cut``
ids per chunk). An added or deleted id changes one chunk's entries, not the cuts elsewhere, so an
incremental backup finds every other chunk unchanged (same ids at the same versions → same
``entries`` digest) and reuses its file without reading its records from the shard.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

from loupe.v1 import shard_pb2
from services.common.errors import DataLoss

MAX_IDS_PER_CUT = 1 << 16
CUT_KEY = b"loupe-backup-cut"


def ids_per_cut(target_bytes: int, bytes_per_record: float) -> int:
    """Expected ids per chunk so that a chunk holds about ``target_bytes``: a power of two (so
    that a doubled or halved value keeps half of the cuts), in 1..65536."""
    want = max(1.0, target_bytes / max(1.0, bytes_per_record))
    n = 1
    while n * 2 <= want and n * 2 <= MAX_IDS_PER_CUT:
        n *= 2
    return n


def cuts_after(image_id: str, per_cut: int) -> bool:
    """Whether a chunk ends after ``image_id`` (a deterministic function of the id alone)."""
    h = hashlib.blake2b(image_id.encode("utf-8"), digest_size=8, key=CUT_KEY).digest()
    return int.from_bytes(h, "little") % per_cut == 0


def entries_digest(entries: Iterable[tuple[str, int]]) -> str:
    """SHA-256 (hex) over a chunk's (id, version) entries in order: equal iff the chunk would hold
    the same records at the same versions."""
    h = hashlib.sha256()
    for image_id, version in entries:
        h.update(image_id.encode("utf-8"))
        h.update(b"\0")
        h.update(version.to_bytes(8, "little"))
    return h.hexdigest()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def encode_chunk(records: Sequence[shard_pb2.ShardRecord]) -> bytes:
    """Records → chunk file bytes (deterministic: the same records give the same bytes)."""
    parts = []
    for r in records:
        body = r.SerializeToString(deterministic=True)
        parts.append(_varint(len(body)))
        parts.append(body)
    return b"".join(parts)


def decode_chunk(data: bytes, name: str) -> list[shard_pb2.ShardRecord]:
    """Chunk file bytes → records; ``DataLoss`` naming ``name`` when the framing or a message is broken."""
    records = []
    pos, end = 0, len(data)
    while pos < end:
        length, shift = 0, 0
        while True:
            if pos >= end or shift > 63:
                raise DataLoss(f"{name}: truncated record length at byte {pos}")
            b = data[pos]
            pos += 1
            length |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        if pos + length > end:
            raise DataLoss(f"{name}: record {len(records)} is cut short ({end - pos} of {length} bytes)")
        rec = shard_pb2.ShardRecord()
        try:
            rec.ParseFromString(data[pos:pos + length])
        except Exception as exc:  # protobuf's DecodeError (its class differs between implementations)
            raise DataLoss(f"{name}: record {len(records)} does not parse ({exc})") from None
        if not rec.id:
            raise DataLoss(f"{name}: record {len(records)} has no id")
        records.append(rec)
        pos += length
    return records


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
