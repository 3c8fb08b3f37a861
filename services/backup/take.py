"""Taking a backup of a live collection: every shard's records, the model files, a manifest.

Per shard, the version list (``ListVersions``, ~30 bytes per id) is paged from one in-sync
replica in id order and cut into chunks (``chunks.cuts_after``); a chunk whose (id, version)
entries equal a chunk of the previous backup at the same URL is reused as it is (incremental),
any other one is read with ``GetRecords`` from in-sync replicas and written as
``chunks/<sha256>``. Shards are copied at once, each one page and one chunk at a time, so memory
stays at a few chunks whatever the shard size; searches and writes go on meanwhile.

What the copy holds: the broker's write clock is read when the backup starts
(``started_version``); every write acknowledged before that is on every in-sync replica, so every
id is listed at that write or a later one and its record read at that version or a later one —
an acknowledged write is in the backup, an acknowledged delete keeps its id out. A write made
while the backup runs may or may not be in it; a record is always whole, at one version.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence, TypeVar

from loupe.v1 import shard_pb2
from services.backup.chunks import cuts_after, encode_chunk, entries_digest, ids_per_cut, sha256_hex
from services.backup.manifest import BACKUPS, ChunkEntry, FileEntry, Manifest, ShardEntry, manifest_name
from services.backup.storage import BackupStorage
from services.broker.backends import ShardClient
from services.broker.catch_up import PAGE
from services.common.errors import DataLoss, Unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")
Run = Callable[..., Awaitable[Any]]
"""``run(fn, *args)``: runs blocking work (storage, hashing) off the event loop."""

TARGET_CHUNK_BYTES = 4 << 20
"""About this many bytes per chunk file."""
MAX_CHUNK_FACTOR = 8
"""A chunk ends after ``MAX_CHUNK_FACTOR * ids_per_cut`` ids even without a cut point."""
GET_RECORDS_IDS = 1000


@dataclass
class BackupSettings:
    """How a backup is taken: ``full`` rewrites every chunk, ``timeout_s`` bounds each shard call."""

    full: bool = False
    timeout_s: float = 60.0
    target_chunk_bytes: int = TARGET_CHUNK_BYTES
    page: int = PAGE


def new_backup_id(now: float | None = None) -> str:
    """``YYYYMMDDTHHMMSSmmmZ-xxxxxx`` (UTC, milliseconds): sorts by time (backups of one broker
    never start in the same millisecond: they run one at a time), unique by the random suffix."""
    now = time.time() if now is None else now
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{int(now * 1000) % 1000:03d}Z-" + secrets.token_hex(3)


def list_manifests(storage: BackupStorage) -> tuple[list[str], list[str]]:
    """(complete backup ids, incomplete ones: chunks or a checksum without a manifest), oldest first."""
    ids: dict[str, bool] = {}
    for name in storage.list(BACKUPS):
        parts = name[len(BACKUPS):].split("/")
        if len(parts) == 2:
            ids[parts[0]] = ids.get(parts[0], False) or parts[1] == "manifest.json"
    return sorted(i for i, ok in ids.items() if ok), sorted(i for i, ok in ids.items() if not ok)


def read_manifest(storage: BackupStorage, backup_id: str) -> Manifest:
    """A backup's manifest, checked against its checksum file; ``DataLoss`` naming the file."""
    from services.backup.storage import MissingObject

    name = manifest_name(backup_id)
    try:
        data = storage.get(name)
    except MissingObject:
        raise DataLoss(f"{name}: missing (backup {backup_id!r} is incomplete or does not exist at {storage.url})") from None
    try:
        want = storage.get(name + ".sha256").decode("ascii", "replace").strip()
    except MissingObject:
        raise DataLoss(f"{name}.sha256: missing (the manifest's checksum)") from None
    got = sha256_hex(data)
    if got != want:
        raise DataLoss(f"{name}: checksum mismatch (manifest.json.sha256 says {want[:16]}…, the file hashes to {got[:16]}…)")
    return Manifest.from_json(data, name)


def _previous(storage: BackupStorage) -> Manifest | None:
    """The newest readable backup at this URL (its chunks may be reused), or None."""
    complete, _ = list_manifests(storage)
    for backup_id in reversed(complete):
        try:
            return read_manifest(storage, backup_id)
        except DataLoss as exc:
            log.warning("backup: not reusing %s: %s", backup_id, exc)
    return None


class _Chunks:
    """Writes chunk files of one backup, reusing those an earlier backup wrote."""

    def __init__(self, storage: BackupStorage, previous: Manifest | None, run: Run) -> None:
        self.storage, self.run = storage, run
        self.reusable = {c.entries: c for s in (previous.shards if previous else []) for c in s.chunks}
        self.known: set[str] = set()
        self.bytes_written = 0
        self.reused = 0
        self.written = 0

    async def reuse(self, digest: str) -> ChunkEntry | None:
        c = self.reusable.get(digest)
        if c is None:
            return None
        if c.file not in self.known and not await self.run(self.storage.exists, c.file):
            return None
        self.known.add(c.file)
        self.reused += 1
        return c

    async def write(self, records: list[shard_pb2.ShardRecord]) -> ChunkEntry:
        def encode() -> tuple[bytes, str]:
            data = encode_chunk(records)
            return data, sha256_hex(data)

        data, sha = await self.run(encode)
        name = f"chunks/{sha}"
        if name not in self.known and not await self.run(self.storage.exists, name):
            await self.run(self.storage.put, name, data)
            self.bytes_written += len(data)
        self.known.add(name)
        self.written += 1
        return ChunkEntry(file=name, sha256=sha, bytes=len(data), records=len(records),
                          entries=entries_digest((r.id, r.version) for r in records), first_id=records[0].id, last_id=records[-1].id)


async def _fetch(shard: ShardClient, ids: list[str], timeout_s: float) -> list[shard_pb2.ShardRecord]:
    """Whole records of ``ids`` (in order) from in-sync replicas; ids deleted meanwhile are absent."""
    out: list[shard_pb2.ShardRecord] = []
    while ids:
        resp = await shard.get_records(shard_pb2.GetRecordsRequest(shard_id=shard.shard_id, ids=ids[:GET_RECORDS_IDS]), timeout_s)
        if resp.consumed < 1:
            raise Unavailable(f"shard {shard.shard_id}: GetRecords answered no id of {len(ids)}")
        out.extend(resp.records)
        ids = ids[resp.consumed:]
    return out


async def _backup_shard(shard: ShardClient, chunks: _Chunks, previous: Manifest | None, settings: BackupSettings) -> ShardEntry:
    st = await shard.stats(settings.timeout_s)
    per_record = (st.feature_bytes / st.images) if st.images else 1.0
    per_cut = ids_per_cut(settings.target_chunk_bytes, per_record + 256)
    prev = next((s for s in previous.shards if s.shard == shard.shard_id), None) if previous else None
    if prev is not None and prev.ids_per_cut and per_cut / 4 <= prev.ids_per_cut <= per_cut * 4:
        per_cut = prev.ids_per_cut  # the same cuts as last time, while record sizes stay in range
    entry = ShardEntry(shard=shard.shard_id, images=0, tombstones=0, ids_per_cut=per_cut, store_id=st.store_id,
                       sequence=st.sequence, max_version=st.max_version)
    group: list[tuple[str, int]] = []
    group_ids = 0

    async def flush() -> None:
        nonlocal group, group_ids
        live, group, group_ids = group, [], 0
        if not live:
            return
        reused = await chunks.reuse(entries_digest(live))
        if reused is not None:
            entry.chunks.append(reused)
            entry.images += reused.records
            return
        records = await _fetch(shard, [i for i, _ in live], settings.timeout_s)
        if records:
            c = await chunks.write(records)
            entry.chunks.append(c)
            entry.images += c.records

    after = ""
    while True:
        page = await shard.list_versions(shard_pb2.ListVersionsRequest(shard_id=shard.shard_id, after=after, limit=settings.page),
                                         settings.timeout_s)
        for image_id, version, deleted in zip(page.ids, page.versions, page.deleted):
            group_ids += 1
            if deleted:
                entry.tombstones += 1
            else:
                group.append((image_id, version))
            if cuts_after(image_id, per_cut) or group_ids >= MAX_CHUNK_FACTOR * per_cut:
                await flush()
        if page.done or not page.ids:
            break
        after = page.ids[-1]
    await flush()
    return entry


async def take_backup(storage: BackupStorage, shards: Sequence[ShardClient], model_files: dict[str, bytes], *, started_version: int,
                      layout: dict[str, Any], model: dict[str, Any], run: Run, settings: BackupSettings = BackupSettings()) -> Manifest:
    """Back up ``shards`` and ``model_files`` to ``storage``; returns the written manifest.

    ``started_version`` must be read from the broker's clock before anything else (see the module
    docstring). Raises the shards' and the storage's domain errors; a failed backup leaves no
    manifest (its chunks are reused by the next one)."""
    t0 = time.monotonic()
    backup_id = new_backup_id()
    previous = None if settings.full else await run(_previous, storage)
    chunks = _Chunks(storage, previous, run)
    entries = await asyncio.gather(*(_backup_shard(s, chunks, previous, settings) for s in shards))
    files = []
    for name, data in sorted(model_files.items()):
        sha = sha256_hex(data)
        file = f"files/{sha}"
        if not await run(storage.exists, file):
            await run(storage.put, file, data)
            chunks.bytes_written += len(data)
        files.append(FileEntry(name=name, file=file, sha256=sha, bytes=len(data)))
    manifest = Manifest(id=backup_id, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), started_version=started_version,
                        layout=layout, model=model, shards=list(entries), files=files, seconds=0.0,
                        incremental_from=previous.id if previous is not None else "", bytes_written=chunks.bytes_written,
                        chunks_reused=chunks.reused)
    manifest.seconds = round(time.monotonic() - t0, 3)
    data = manifest.to_json()
    name = manifest_name(backup_id)
    await run(storage.put, name + ".sha256", sha256_hex(data).encode("ascii"))
    await run(storage.put, name, data)  # last: a backup is complete once its manifest exists
    log.info("backup %s: %d images in %d chunks (%d reused), %.1f MB written, %.1f s", backup_id, manifest.images,
             chunks.written + chunks.reused, chunks.reused, chunks.bytes_written / 1e6, manifest.seconds)
    return manifest
