"""The manifest of one backup (``backups/<id>/manifest.json``) and its checksum file.

It lists every file the backup consists of with its SHA-256 and size (chunk files per shard with
their record counts and entries digests, the broker's model files), the source layout, the write
version the backup started at and counts. ``manifest.json.sha256`` beside it holds the manifest's
own SHA-256: a backup whose manifest is missing, cut short or altered is refused as a whole.

A backup is complete once its manifest exists (it is written last): an interrupted backup leaves
chunk files that the next backup may reuse, and no manifest.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from services.common.errors import DataLoss

FORMAT = "loupe-backup-1"
BACKUPS = "backups/"
ID_PATTERN = re.compile(r"^[0-9]{8}T[0-9]{9}Z-[0-9a-f]{6}$")


def manifest_name(backup_id: str) -> str:
    return f"{BACKUPS}{backup_id}/manifest.json"


@dataclass
class ChunkEntry:
    """One chunk file: ``file`` (``chunks/<sha256>``), its ``sha256`` and ``bytes``, the ``records``
    it holds, their (id, version) ``entries`` digest and the first and last id."""

    file: str
    sha256: str
    bytes: int
    records: int
    entries: str
    first_id: str
    last_id: str


@dataclass
class ShardEntry:
    """One source shard: its chunks in id order, counts, and where the copy was read from
    (store id, sequence number and newest version of the replica at the start)."""

    shard: int
    images: int
    tombstones: int
    ids_per_cut: int
    store_id: str
    sequence: int
    max_version: int
    chunks: list[ChunkEntry] = field(default_factory=list)


@dataclass
class FileEntry:
    """One broker model file (``whitening.npz``, ``local_pca.npz``, ``graph.npz``, ...)."""

    name: str
    file: str
    sha256: str
    bytes: int


@dataclass
class Manifest:
    """A complete backup (see the module docstring).

    ``started_version``: the broker's write clock when the backup started; every write
    acknowledged before has a lower version and is in the backup."""

    id: str
    created: str
    started_version: int
    layout: dict[str, Any]
    model: dict[str, Any]
    shards: list[ShardEntry]
    files: list[FileEntry]
    seconds: float = 0.0
    incremental_from: str = ""
    bytes_written: int = 0
    chunks_reused: int = 0
    format: str = FORMAT

    @property
    def images(self) -> int:
        return sum(s.images for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(c.bytes for s in self.shards for c in s.chunks) + sum(f.bytes for f in self.files)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode("utf-8")

    @staticmethod
    def from_json(data: bytes, name: str) -> "Manifest":
        """Parse and check a manifest; ``DataLoss`` naming ``name`` when it is not a valid one."""
        try:
            raw = json.loads(data.decode("utf-8"))
            if raw.get("format") != FORMAT:
                raise ValueError(f"format {raw.get('format')!r}, expected {FORMAT!r}")
            shards = [ShardEntry(**{**s, "chunks": [ChunkEntry(**c) for c in s["chunks"]]}) for s in raw["shards"]]
            files = [FileEntry(**f) for f in raw["files"]]
            m = Manifest(**{**raw, "shards": shards, "files": files})
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            raise DataLoss(f"{name}: not a valid loupe backup manifest ({type(exc).__name__}: {exc})") from None
        m.check(name)
        return m

    def check(self, name: str) -> None:
        """Internal consistency: ids, shard numbering, file names matching their checksums."""
        if not ID_PATTERN.match(self.id):
            raise DataLoss(f"{name}: backup id {self.id!r} is malformed")
        if [s.shard for s in self.shards] != list(range(len(self.shards))) or not self.shards:
            raise DataLoss(f"{name}: shards must be numbered 0..S-1, got {[s.shard for s in self.shards]}")
        for s in self.shards:
            if sum(c.records for c in s.chunks) != s.images:
                raise DataLoss(f"{name}: shard {s.shard} lists {s.images} images but its chunks hold {sum(c.records for c in s.chunks)}")
            for c in s.chunks:
                if c.file != f"chunks/{c.sha256}" or not re.fullmatch(r"[0-9a-f]{64}", c.sha256):
                    raise DataLoss(f"{name}: shard {s.shard} chunk {c.file!r} is not named by its checksum")
        for f in self.files:
            if f.file != f"files/{f.sha256}" or not re.fullmatch(r"[0-9a-f]{64}", f.sha256):
                raise DataLoss(f"{name}: model file {f.name!r} ({f.file!r}) is not named by its checksum")
