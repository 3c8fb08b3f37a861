"""Restoring a backup into a cluster of any shard count.

1. **Verify** before writing anything: the manifest against its checksum file, then every file
   it lists (model files, chunk files) read back whole, hashed and, for chunks, parsed and
   counted. A missing, cut-short or altered file → ``DataLoss`` naming the file; nothing is written.
2. **Write**: each chunk is read again (and hashed again), its records are re-placed by the
   target's placement (``Placement.shard_of(id)`` of the target cluster) and stored with ``Add`` carrying each
   record's own version. A record written twice is the same write (last writer wins on equal
   versions), so a restore that stopped midway is completed by running it again.

The broker's model files are installed by the caller (``services.broker.backups``) between the two.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence

from loupe.v1 import shard_pb2
from services.backup.chunks import decode_chunk, sha256_hex
from services.backup.manifest import ID_PATTERN, Manifest
from services.backup.storage import BackupStorage, MissingObject
from services.backup.take import list_manifests, read_manifest
from services.broker.backends import ShardClient
from services.common.errors import DataLoss, InvalidArgument, NotFound
from services.common.limits import MAX_WRITE_RECORDS
from services.space.placement import Placement

log = logging.getLogger(__name__)
Run = Callable[..., Awaitable[Any]]

VERIFY_CONCURRENCY = 4
ADD_RECORDS = 256


@dataclass
class RestoreSettings:
    """``timeout_s`` bounds each shard call; an Add carries at most ``max_add_bytes`` of records."""

    timeout_s: float = 120.0
    max_add_bytes: int = 32 << 20


def resolve(storage: BackupStorage, backup_id: str) -> Manifest:
    """The manifest of ``backup_id`` ("" = the newest complete backup at the URL), verified."""
    if backup_id and not ID_PATTERN.match(backup_id):
        raise InvalidArgument(f"backup_id: {backup_id!r} is not a backup id (YYYYMMDDTHHMMSSmmmZ-xxxxxx; see loupe backup --list)")
    if not backup_id:
        complete, incomplete = list_manifests(storage)
        if not complete:
            extra = f" ({len(incomplete)} incomplete)" if incomplete else ""
            raise NotFound(f"url: no complete backup at {storage.url}{extra}")
        backup_id = complete[-1]
    return read_manifest(storage, backup_id)


def _file_list(manifest: Manifest) -> list[tuple[str, str, int, str]]:
    """(file, sha256, records or -1, what) of every file the backup consists of, each once."""
    out: dict[str, tuple[str, str, int, str]] = {}
    for f in manifest.files:
        out.setdefault(f.file, (f.file, f.sha256, -1, f"model file {f.name}"))
    for s in manifest.shards:
        for j, c in enumerate(s.chunks):
            out.setdefault(c.file, (c.file, c.sha256, c.records, f"shard {s.shard} chunk {j + 1} of {len(s.chunks)}"))
    return list(out.values())


def read_checked(storage: BackupStorage, file: str, sha256: str, what: str, backup_id: str) -> bytes:
    """A file's bytes, hashed against the manifest; ``DataLoss`` naming the file otherwise."""
    try:
        data = storage.get(file)
    except MissingObject:
        raise DataLoss(f"{file}: missing ({what} of backup {backup_id})") from None
    got = sha256_hex(data)
    if got != sha256:
        raise DataLoss(f"{file}: checksum mismatch ({what} of backup {backup_id}: the manifest says {sha256[:16]}…, "
                       f"the file's {len(data)} bytes hash to {got[:16]}…)")
    return data


def _verify_one(storage: BackupStorage, item: tuple[str, str, int, str], backup_id: str) -> int:
    file, sha, records, what = item
    data = read_checked(storage, file, sha, what, backup_id)
    if records >= 0:
        n = len(decode_chunk(data, file))
        if n != records:
            raise DataLoss(f"{file}: holds {n} records, the manifest says {records} ({what} of backup {backup_id})")
    return len(data)


async def verify(storage: BackupStorage, manifest: Manifest, run: Run) -> int:
    """Read back, hash and parse every file of the backup; returns the bytes read. ``DataLoss``
    naming the first bad file (nothing has been written then)."""
    items = _file_list(manifest)
    sem = asyncio.Semaphore(VERIFY_CONCURRENCY)

    async def one(item: tuple[str, str, int, str]) -> int:
        async with sem:
            return await run(_verify_one, storage, item, manifest.id)

    results = await asyncio.gather(*(one(i) for i in items), return_exceptions=True)
    for r in results:  # the first failure in manifest order, whatever finished first
        if isinstance(r, BaseException):
            raise r
    return int(sum(results))  # type: ignore[arg-type]


def model_files(storage: BackupStorage, manifest: Manifest) -> dict[str, bytes]:
    """The broker model files of the backup, by name, checksums verified."""
    return {f.name: read_checked(storage, f.file, f.sha256, f"model file {f.name}", manifest.id) for f in manifest.files}


def _batches(records: Sequence[shard_pb2.ShardRecord], max_bytes: int) -> list[list[shard_pb2.ShardRecord]]:
    out: list[list[shard_pb2.ShardRecord]] = []
    cur: list[shard_pb2.ShardRecord] = []
    size = 0
    for r in records:
        n = r.ByteSize()
        if cur and (len(cur) >= min(ADD_RECORDS, MAX_WRITE_RECORDS) or size + n > max_bytes):
            out.append(cur)
            cur, size = [], 0
        cur.append(r)
        size += n
    if cur:
        out.append(cur)
    return out


@dataclass
class WriteProgress:
    """Records written so far of how many (for the error message of a failed restore)."""

    written: int = 0
    total: int = 0
    max_version: int = 0


async def write_records(storage: BackupStorage, manifest: Manifest, shards: Sequence[ShardClient], run: Run,
                        progress: WriteProgress, settings: RestoreSettings = RestoreSettings(), placement: Placement | None = None) -> None:
    """Store every record of the backup on its target shard (``placement.shard_of(id)``; None = the
    bucket placement over ``shards``) with its version. The next chunk is read while the current one is written."""
    placement = placement or Placement(len(shards))
    chunks = [(c, f"shard {s.shard} chunk {j + 1} of {len(s.chunks)}") for s in manifest.shards for j, c in enumerate(s.chunks)]
    progress.total = manifest.images

    def load(i: int) -> list[shard_pb2.ShardRecord]:
        c, what = chunks[i]
        return decode_chunk(read_checked(storage, c.file, c.sha256, what, manifest.id), c.file)

    nxt = asyncio.ensure_future(run(load, 0)) if chunks else None
    try:
        for i in range(len(chunks)):
            assert nxt is not None
            records = await nxt
            nxt = asyncio.ensure_future(run(load, i + 1)) if i + 1 < len(chunks) else None
            by_shard: dict[int, list[shard_pb2.ShardRecord]] = {}
            for r in records:
                by_shard.setdefault(placement.shard_of(r.id), []).append(r)
                progress.max_version = max(progress.max_version, r.version)

            async def store(sid: int, recs: list[shard_pb2.ShardRecord]) -> None:
                for batch in _batches(recs, settings.max_add_bytes):
                    await shards[sid].add(shard_pb2.ShardAddRequest(shard_id=sid, records=batch), settings.timeout_s)
                    progress.written += len(batch)

            await asyncio.gather(*(store(s, r) for s, r in by_shard.items()))
    finally:
        if nxt is not None:
            nxt.cancel()
