"""Backup, ListBackups and Restore: the broker's side of ``services.backup``.

The broker takes and restores backups itself: it reaches every shard replica (``GetRecords``,
``ListVersions``, ``Add`` with versions), owns the model files and the write clock. The storage
(a directory on the broker's machine, or S3 with the broker's ``AWS_*`` environment) is opened
per call from the request's url. One backup or restore runs at a time per broker.

A restore leaves a marker (``restore.json`` in the broker's data directory, in memory without
one) naming the backup while it writes: the cluster is no longer empty then, and only a restore of
the same backup may run into it again (completing the one that stopped).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Sequence

from loupe.v1 import retrieval_pb2, shard_pb2
from services.backup import restore as restoring
from services.backup.storage import BackupStorage, open_storage
from services.backup.take import BackupSettings, list_manifests, read_manifest, take_backup
from services.broker.marker_file import MarkerFile
from services.broker.backends import ExtractorPool, ShardClient
from services.broker.collection_model import CollectionModel
from services.broker.deadlines import Deadline
from services.broker.versions import VersionClock
from services.common.errors import DataLoss, FailedPrecondition, LoupeError, Unavailable
from services.broker.routing import Routing
from services.space.placement import Placement

log = logging.getLogger(__name__)

MARKER = "restore.json"
MODEL_KEYS = ("backbone", "pooling", "dim")
"""Extractor settings a restored collection must share with the cluster (else its vectors and
the queries' live in different spaces)."""


class Backups:
    """The three rpcs' bodies over the broker's shards, collection model and clock."""

    def __init__(self, extractors: ExtractorPool, shards: Sequence[ShardClient], collection: CollectionModel, clock: VersionClock,
                 max_message_bytes: int, open_store: Callable[[str], BackupStorage] = open_storage, routing: Routing | None = None) -> None:
        self.routing = routing or Routing(Placement(len(shards)))  # None: the bucket placement over shards, no reshard
        self.extractors = extractors
        self.shards = shards
        self.collection = collection
        self.clock = clock
        self.max_message_bytes = max_message_bytes
        self.open_store = open_store
        self._busy = asyncio.Lock()
        self._marker = MarkerFile(collection.directory, MARKER, "restore")

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    def exclusive(self) -> asyncio.Lock:
        """The lock of the collection-wide operations (backup, restore, reshard: one at a time)."""
        if self._busy.locked():
            raise FailedPrecondition("broker: a backup, restore or reshard is already running; try again when it has finished")
        return self._busy

    async def _model(self, timeout_s: float) -> dict[str, Any]:
        try:
            d = await self.extractors.describe(timeout_s)
        except Unavailable:
            return {}
        return {"backbone": d.backbone, "pooling": d.pooling, "dim": d.dim, "local_dim": d.local_dim, "scales": [round(s, 4) for s in d.scales],
                "max_side": d.max_side}

    # --- Backup ---------------------------------------------------------------------------
    async def backup(self, request: retrieval_pb2.BackupRequest, deadline: Deadline) -> retrieval_pb2.BackupResponse:
        storage = await self._run(self.open_store, request.url)
        async with self.exclusive():
            started_version = self.clock.next()  # before anything is read: every acknowledged write is below it
            model = await self._model(min(5.0, deadline.remaining()))
            files = await self._run(self.collection.files)
            layout = {"shards": self.routing.current.shards, "placement": self.routing.current.rule,
                      "replication_factor": len(getattr(self.shards[0], "replicas", [None]))}
            m = await take_backup(storage, self.shards, files, started_version=started_version, layout=layout, model=model, run=self._run,
                                  settings=BackupSettings(full=request.full, timeout_s=min(60.0, max(1.0, deadline.remaining()))))
        return retrieval_pb2.BackupResponse(
            backup_id=m.id, images=m.images, shards=len(m.shards), chunks=sum(len(s.chunks) for s in m.shards), chunks_reused=m.chunks_reused,
            bytes=m.bytes, bytes_written=m.bytes_written, seconds=m.seconds, started_version=m.started_version,
            incremental_from=m.incremental_from,
        )

    # --- ListBackups ----------------------------------------------------------------------
    async def list(self, request: retrieval_pb2.ListBackupsRequest) -> retrieval_pb2.ListBackupsResponse:
        storage = await self._run(self.open_store, request.url)
        return await self._run(list_backups, storage)

    # --- Restore --------------------------------------------------------------------------
    async def restore(self, request: retrieval_pb2.RestoreRequest, deadline: Deadline) -> retrieval_pb2.RestoreResponse:
        t0 = time.monotonic()
        storage = await self._run(self.open_store, request.url)
        async with self.exclusive():
            manifest = await self._run(restoring.resolve, storage, request.backup_id)
            await self._check_model(manifest.model, min(5.0, deadline.remaining()))
            resumed = await self._check_empty(manifest.id, min(30.0, deadline.remaining()))
            t_verify = time.monotonic()
            read = await restoring.verify(storage, manifest, self._run)
            verify_s = time.monotonic() - t_verify
            await self._run(self._marker.set, {"backup_id": manifest.id, "url": storage.url, "state": "writing"})
            progress = restoring.WriteProgress(total=manifest.images)
            try:
                files = await self._run(restoring.model_files, storage, manifest)
                await self._run(self.collection.install, files)
                payload = self.collection.whitening_payload()  # b"" = none: the shards drop any they had
                await asyncio.gather(*(s.set_whitening(shard_pb2.SetWhiteningRequest(shard_id=s.shard_id, whitening=payload),
                                                       max(1.0, deadline.remaining())) for s in self.shards))
                settings = restoring.RestoreSettings(timeout_s=min(120.0, max(1.0, deadline.remaining())),
                                                     max_add_bytes=max(1 << 20, self.max_message_bytes // 2))
                await restoring.write_records(storage, manifest, self.shards, self._run, progress, settings, self.routing.current)
            except LoupeError as exc:
                raise type(exc)(
                    f"restore of backup {manifest.id} stopped after {progress.written} of {progress.total} images were written: {exc}. "
                    f"The cluster holds part of the backup: run the same restore again to complete it (records are rewritten "
                    f"with their own versions, nothing is doubled)"
                ) from None
            self.clock.observe(progress.max_version)
            await self._run(self._marker.set, {"backup_id": manifest.id, "url": storage.url, "state": "done"})
        source = len(manifest.shards)
        log.warning("restored backup %s (%d images, %d → %d shards) in %.1f s", manifest.id, manifest.images, source, len(self.shards),
                    time.monotonic() - t0)
        return retrieval_pb2.RestoreResponse(
            backup_id=manifest.id, images=manifest.images, source_shards=source, target_shards=len(self.shards),
            bytes_read=read + manifest.bytes, seconds=time.monotonic() - t0, verify_seconds=verify_s, resumed=resumed,
        )

    async def _check_model(self, backed_up: dict[str, Any], timeout_s: float) -> None:
        here = await self._model(timeout_s)
        if not backed_up or not here:
            return  # unknown on one side (no extractor reachable): the shards still check dimensions
        for key in MODEL_KEYS:
            if backed_up.get(key) != here.get(key):
                raise FailedPrecondition(
                    f"backup: its images were described with {key}={backed_up.get(key)!r}, this cluster's extractors use "
                    f"{key}={here.get(key)!r}: start the cluster with the backup's model settings"
                )

    async def _check_empty(self, backup_id: str, timeout_s: float) -> bool:
        """Whether the target holds a stopped restore of ``backup_id`` (resumed); ``FailedPrecondition``
        when it holds anything else."""
        stats = await asyncio.gather(*(s.stats(timeout_s) for s in self.shards))
        held = {s.shard_id: st.images + st.tombstones for s, st in zip(self.shards, stats)}
        marker = await self._run(self._marker.get)
        if not any(held.values()):
            return False  # empty shards: the model files (and any old marker) are replaced
        if marker is not None and marker.get("backup_id") == backup_id:
            return True  # a restore of this backup stopped midway (or ran already): rewriting is idempotent
        detail = ", ".join(f"shard {i}: {n} ids" for i, n in held.items() if n)
        what = f"; it holds part or all of backup {marker['backup_id']}" if marker is not None else ""
        raise FailedPrecondition(f"cluster: not empty ({detail}{what}): restore into a new cluster or onto empty volumes")



def list_backups(storage: BackupStorage) -> retrieval_pb2.ListBackupsResponse:
    """Every backup at ``storage``, oldest first, with its manifest's summary (blocking)."""
    complete, incomplete = list_manifests(storage)
    resp = retrieval_pb2.ListBackupsResponse()
    for backup_id in sorted(complete + incomplete):
        info = resp.backups.add(backup_id=backup_id, complete=backup_id in complete)
        if not info.complete:
            continue
        try:
            m = read_manifest(storage, backup_id)
        except DataLoss as exc:
            info.complete, info.problem = False, str(exc)
            continue
        info.created, info.images, info.shards, info.bytes = m.created, m.images, len(m.shards), m.bytes
        info.seconds, info.incremental_from = m.seconds, m.incremental_from
    return resp
