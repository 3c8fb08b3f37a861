"""A shard's durable records in LMDB: vectors, regional centroids, local features, metadata.

Why LMDB (bench/storage_engines.py, BENCHMARKS.md "Storage engine"): a commit is durable when it
returns (copy-on-write B+tree, fsync at commit: no log to replay, reopening takes < 1 ms at any
size), reads are zero-copy from a memory map (one image's local features in ~9 µs, the path every
verified candidate takes), it runs no background threads on a 2-core node, a full disk fails the
commit with ENOSPC and leaves the environment usable, and freed pages are reused by later writes
(the file is compacted on open when more than half of it, and at least 1 MiB, is free).

Layout (one LMDB environment per shard directory, named sub-databases):

- ``ids``:      image id (UTF-8) → label (uint64 BE)
- ``info``:     label → id, width, height, metadata          (+ CRC32)
- ``vec``:      label → raw global vector, float32 (D,)        (+ CRC32)
- ``reg``:      label → regional centroids, float16 (R, D)     (+ CRC32)
- ``loc``:      label → local features: keypoints float16 (N, 4), descriptors int8 (N, C), scale
- ``changes``:  sequence number → (op, label): what the faiss snapshot has not seen yet
- ``versions``: image id → (version, deleted, digest term): the last write of every id, live or
  deleted (a tombstone), for replication (see below)
- ``settings``: counters, dimension, whitening, snapshot record, store id

Replication: every write carries a version (the broker's clock, ``services.broker.versions``);
a store applies a write only when its version is newer than the one it holds for that id (last
writer wins), so replicas that receive the same writes in any order, or copies of each other's
records during a catch-up, converge. Deletes leave tombstones, so a copy of an older record can
never bring a deleted image back. The ``digest`` counter is the sum (mod 2^64) of one 64-bit hash
per id over (id, version, deleted, global vector): two replicas holding the same ids, versions
and vectors have equal digests, whatever order the writes came in. ``store_id`` is random per
store directory: a replica whose volume was replaced shows a new one.

Records above today's write limits (``services.common.limits``: stored before a limit existed,
or written around the shard's checks) are counted in the ``oversized`` counter, kept up to date
by every write; a store that predates the counter is scanned once when it is opened.

Labels only grow (a replaced image gets a new one), so label order is a cursor that survives
concurrent writes. Every write transaction bumps the sequence number; the faiss snapshot records
the sequence it reflects and the ``changes`` entries up to it are dropped when it is saved.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import struct
import time
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import lmdb
import numpy as np

from loupe.v1 import shard_pb2
from services.common.errors import DataLoss, InvalidArgument, Overloaded, Unavailable
from services.common import limits

log = logging.getLogger(__name__)

_U64 = struct.Struct(">Q")
_CRC = struct.Struct("<I")
_INFO = struct.Struct("<IIH")  # width, height, id length
_LOCAL = struct.Struct("<IIf")  # keypoints, descriptor dim, dequantisation scale
_CHANGE = struct.Struct(">BQ")  # op, label
_VERSION = struct.Struct(">QBQ")  # version, deleted, digest term
OP_ADD, OP_DELETE = 1, 2
_CHANGE_BITS = 20  # a change's key is seq << 20 | n: one write holds up to 2^20 changes, in order
FORMAT_VERSION = 1
_DBS = ("ids", "info", "vec", "reg", "loc", "changes", "versions", "settings")
_COUNTERS = ("seq", "next_label", "images", "regional_vectors", "local_features", "feature_bytes", "oversized",
             "max_version", "digest", "tombstones")
_MASK64 = (1 << 64) - 1
_OVERSIZED_SCANNED = b"oversized_scanned"  # setting: the limits the oversized counter was counted against
_LIMITS_TAG = "/".join(str(x) for x in (
    limits.MAX_METADATA_ENTRIES, limits.MAX_METADATA_KEY_BYTES, limits.MAX_METADATA_VALUE_BYTES, limits.MAX_METADATA_BYTES,
    limits.MAX_VECTOR_DIM, limits.MAX_REGIONS_PER_IMAGE, limits.MAX_LOCAL_FEATURES_PER_IMAGE, limits.MAX_LOCAL_DESCRIPTOR_DIM,
)).encode()


class StoreCorrupt(DataLoss):
    """The store cannot be read back as written (checksum, format or LMDB structure)."""


class StoreFull(Overloaded):
    """The disk (or the map) has no room for a write; nothing of that write was stored."""


@dataclass
class LocalStore:
    """Compact local features of one image.

    Attributes
    ----------
    keypoints : np.ndarray
        (N, 4) float16: x, y, scale, score.
    descriptors : np.ndarray
        (N, C) int8, dequantised as ``descriptors * scale``.
    scale : float
        Dequantisation scale of ``descriptors``.
    """

    keypoints: np.ndarray
    descriptors: np.ndarray
    scale: float

    @property
    def nbytes(self) -> int:
        return int(self.keypoints.nbytes + self.descriptors.nbytes)

    @staticmethod
    def quantize(keypoints: np.ndarray, descriptors: np.ndarray) -> "LocalStore":
        """Store (N, 4) keypoints as float16 and (N, C) L2-normalised descriptors as int8.

        Components of unit vectors lie in [-1, 1]; the scale maps the largest magnitude
        present to 127 so small descriptors keep their precision.
        """
        d = np.asarray(descriptors, dtype=np.float32)
        peak = float(np.abs(d).max()) if d.size else 1.0
        scale = (peak if peak > 0 else 1.0) / 127.0
        q = np.clip(np.rint(d / scale), -127, 127).astype(np.int8)
        return LocalStore(np.asarray(keypoints, dtype=np.float16), q, scale)

@dataclass
class StoredImage:
    """Everything a shard keeps of one image (raw vectors: whitening is applied at index time)."""

    image_id: str
    vector: np.ndarray  # (D,) float32, raw L2-normalised
    regional: np.ndarray | None  # (R, D) float16, raw L2-normalised
    local: LocalStore | None
    metadata: dict[str, str] = field(default_factory=dict)
    width: int = 0  # pixels of the image as extracted (local keypoints live in this frame)
    height: int = 0

    @property
    def nbytes(self) -> int:
        n = self.vector.nbytes
        if self.regional is not None:
            n += self.regional.nbytes
        if self.local is not None:
            n += self.local.nbytes
        return int(n)


@dataclass(frozen=True)
class ImageInfo:
    """The small part of a record: id, size as extracted, metadata."""

    image_id: str
    width: int
    height: int
    metadata: dict[str, str]


@dataclass(frozen=True)
class VersionEntry:
    """The last write a store holds for one id."""

    image_id: str
    version: int
    deleted: bool


@dataclass(frozen=True)
class PutResult:
    """What ``ShardStore.put`` changed: ``applied`` indexes the images written (the others were
    older than what the store holds), ``labels`` their new labels, ``replaced`` the labels they
    replaced."""

    labels: list[int]
    replaced: list[int]
    applied: list[int]
    seq: int


def digest_term(image_id: str, version: int, deleted: bool, vector: bytes) -> int:
    """The 64-bit hash one id adds to a store's digest (``vector``: the raw float32 bytes, b"" when deleted)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(image_id.encode("utf-8"))
    h.update(struct.pack(">QB", version, deleted))
    h.update(vector)
    return int.from_bytes(h.digest(), "big")


def above_limits(metadata: dict[str, str], dim: int, regions: int, local: int, local_dim: int) -> str | None:
    """Why a stored record breaks today's write limits (metadata, feature shapes), or None."""
    try:
        limits.check_metadata(metadata, "metadata")
        limits.check_stored_shapes(dim, regions, local, local_dim, "features")
    except InvalidArgument as exc:
        return str(exc)
    return None


def _label_key(label: int) -> bytes:
    return _U64.pack(label)


def _sealed(payload: bytes) -> bytes:
    return payload + _CRC.pack(zlib.crc32(payload))


def _opened(value: bytes | memoryview, what: str) -> memoryview:
    """Strip and check the CRC32 suffix of a stored value."""
    mv = memoryview(value)
    if len(mv) < _CRC.size:
        raise StoreCorrupt(f"{what}: value of {len(mv)} bytes is shorter than its checksum")
    body = mv[: -_CRC.size]
    if zlib.crc32(body) != _CRC.unpack_from(mv, len(mv) - _CRC.size)[0]:
        raise StoreCorrupt(f"{what}: checksum mismatch")
    return body


def _encode_info(img: StoredImage) -> bytes:
    raw_id = img.image_id.encode("utf-8")
    md = shard_pb2.Metadata(values=img.metadata).SerializeToString()
    return _sealed(_INFO.pack(img.width, img.height, len(raw_id)) + raw_id + md)


def _decode_info(value: bytes, what: str) -> ImageInfo:
    body = _opened(value, what)
    width, height, n = _INFO.unpack_from(body)
    start = _INFO.size
    image_id = bytes(body[start : start + n]).decode("utf-8")
    md = shard_pb2.Metadata.FromString(bytes(body[start + n :]))
    return ImageInfo(image_id, width, height, dict(md.values))


def _encode_local(local: LocalStore) -> bytes:
    kp = np.ascontiguousarray(local.keypoints, dtype=np.float16)
    desc = np.ascontiguousarray(local.descriptors, dtype=np.int8)
    return _sealed(_LOCAL.pack(kp.shape[0], desc.shape[1] if desc.ndim == 2 else 0, local.scale) + kp.tobytes() + desc.tobytes())


def _decode_local(value: bytes, what: str) -> LocalStore:
    body = _opened(value, what)
    n, c, scale = _LOCAL.unpack_from(body)
    start = _LOCAL.size
    kp = np.frombuffer(body, np.float16, n * 4, start).reshape(n, 4)
    desc = np.frombuffer(body, np.int8, n * c, start + kp.nbytes).reshape(n, c)
    return LocalStore(kp.copy(), desc.copy(), float(scale))


class ShardStore:
    """The LMDB environment of one shard directory.

    Parameters
    ----------
    path : str
        Directory (created if missing) holding ``data.mdb`` and the faiss snapshot.
    map_size_bytes : int
        Upper bound of the store's size (address space reserved, not disk: the file grows as
        data arrives). Past it writes fail as ``StoreFull``.
    compact_min_free_bytes : int
        The file is compacted at open when more than half of it, and at least this many bytes,
        are free (pages freed by deletes and replaced records), whatever its size.

    Attributes
    ----------
    compacted : bool
        The file was compacted when this store opened (the index's snapshot is rewritten then).
    """

    def __init__(self, path: str, map_size_bytes: int = 1 << 40, compact_min_free_bytes: int = 1 << 20) -> None:
        self.path = path
        self.map_size_bytes = map_size_bytes
        self.compact_min_free_bytes = compact_min_free_bytes
        self.compacted = False
        self.on_commit: Callable[[float], None] | None = None  # called with each durable commit's seconds (metrics)
        os.makedirs(path, exist_ok=True)
        self._compact_if_mostly_free()
        self.env = self._open()

    # --- opening ----------------------------------------------------------------------
    def _open(self) -> lmdb.Environment:
        try:
            env = lmdb.open(
                self.path, map_size=self.map_size_bytes, max_dbs=len(_DBS), sync=True, metasync=True,
                writemap=False, readahead=False, max_readers=256, lock=True,
            )
            self.dbs = {name: env.open_db(name.encode()) for name in _DBS}
        except lmdb.Error as exc:
            raise StoreCorrupt(f"{self.path}: cannot open the shard store ({exc})") from exc
        with env.begin(write=True) as txn:
            fmt = txn.get(b"format", db=self.dbs["settings"])
            if fmt is None:
                txn.put(b"format", str(FORMAT_VERSION).encode(), db=self.dbs["settings"])
            elif int(fmt) != FORMAT_VERSION:
                raise StoreCorrupt(f"{self.path}: store format {fmt.decode()} is not {FORMAT_VERSION}")
            ids = txn.stat(self.dbs["ids"])["entries"]
            infos = txn.stat(self.dbs["info"])["entries"]
            vecs = txn.stat(self.dbs["vec"])["entries"]
        if not ids == infos == vecs:
            raise StoreCorrupt(f"{self.path}: {ids} ids but {infos} records and {vecs} vectors")
        self._count_oversized(env)
        self._add_versions(env)
        return env

    def _add_versions(self, env: lmdb.Environment) -> None:
        """Give the store an id and every record a version entry (version 0), once: stores
        written before replication existed are read as holding the oldest version of each id."""
        with env.begin(write=True, buffers=True) as txn:
            settings = self.dbs["settings"]
            if txn.get(b"store_id", db=settings) is not None:
                return
            digest, n = 0, 0
            for key, label in txn.cursor(db=self.dbs["ids"]):
                image_id = bytes(key).decode("utf-8")
                vec = bytes(_opened(txn.get(bytes(label), db=self.dbs["vec"]), f"vector of {image_id!r}"))
                term = digest_term(image_id, 0, False, vec)
                txn.put(bytes(key), _VERSION.pack(0, 0, term), db=self.dbs["versions"])
                digest, n = (digest + term) & _MASK64, n + 1
            txn.put(b"digest", _U64.pack(digest), db=settings)
            txn.put(b"store_id", uuid.uuid4().hex.encode(), db=settings)
        if n:
            log.info("shard store %s: %d records given version 0 (store written before replication)", self.path, n)

    def _count_oversized(self, env: lmdb.Environment) -> None:
        """Count the records above the write limits, reading only their sizes: once per store
        and again whenever the limits changed since (a store that predates the counter included)."""
        with env.begin(write=True, buffers=True) as txn:
            if txn.get(_OVERSIZED_SCANNED, db=self.dbs["settings"]) == _LIMITS_TAG:
                return
            n = 0
            for key, value in txn.cursor(db=self.dbs["info"]):
                n += _record_above_limits(txn, self.dbs, bytes(key), _decode_info(value, f"info of label {_U64.unpack(key)[0]}")) is not None
            txn.put(b"oversized", _U64.pack(n), db=self.dbs["settings"])
            txn.put(_OVERSIZED_SCANNED, _LIMITS_TAG, db=self.dbs["settings"])
        if n:
            log.warning("shard store %s: %d records are above today's write limits (answers withhold their oversized parts)", self.path, n)

    def _compact_if_mostly_free(self) -> None:
        """Rewrite ``data.mdb`` without its free pages when they are over half of it and at least
        ``compact_min_free_bytes``.

        Runs before the shard serves (no writer exists), so its cost follows the live data,
        not the history of writes.
        """
        data = os.path.join(self.path, "data.mdb")
        if not os.path.exists(data) or os.path.getsize(data) < self.compact_min_free_bytes:
            return
        try:
            env = lmdb.open(self.path, map_size=self.map_size_bytes, max_dbs=len(_DBS), readonly=False, lock=True)
        except lmdb.Error as exc:
            raise StoreCorrupt(f"{self.path}: cannot open the shard store ({exc})") from exc
        try:
            info, stat = env.info(), env.stat()
            used = (info["last_pgno"] + 1) * stat["psize"]
            live = self._live_pages(env) * stat["psize"]
            if live * 2 > used or used - live < self.compact_min_free_bytes:
                return
            tmp = os.path.join(self.path, "compact.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            env.copy(tmp, compact=True)
        finally:
            env.close()
        os.replace(os.path.join(tmp, "data.mdb"), data)
        shutil.rmtree(tmp, ignore_errors=True)
        _fsync_dir(self.path)
        self.compacted = True
        log.info("shard store %s compacted: %.1f MB → %.1f MB", self.path, used / 1e6, os.path.getsize(data) / 1e6)

    @staticmethod
    def _live_pages(env: lmdb.Environment) -> int:
        total = 0
        with env.begin() as txn:
            for name in _DBS:
                try:
                    st = txn.stat(env.open_db(name.encode(), txn=txn, create=False))
                except lmdb.NotFoundError:
                    continue
                total += st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
        return total + 2

    def close(self) -> None:
        self.env.close()

    # --- counters and settings ---------------------------------------------------------
    def counters(self) -> dict[str, int]:
        """seq, next_label, images, regional_vectors, local_features, feature_bytes, oversized,
        max_version (newest write held), digest (see the module docstring), tombstones."""
        with self.env.begin() as txn:
            return {k: self._counter(txn, k) for k in _COUNTERS}

    def _counter(self, txn: lmdb.Transaction, key: str) -> int:
        raw = txn.get(key.encode(), db=self.dbs["settings"])
        return 0 if raw is None else _U64.unpack(raw)[0]

    def oversized(self) -> int:
        """Records above today's write limits (see ``above_limits``)."""
        return self.counters()["oversized"]

    @property
    def store_id(self) -> str:
        """Random id of this store directory (a replaced volume has a new one)."""
        return (self.setting("store_id") or b"").decode()

    def setting(self, key: str) -> bytes | None:
        with self.env.begin() as txn:
            raw = txn.get(key.encode(), db=self.dbs["settings"])
            return None if raw is None else bytes(raw)

    def size_bytes(self) -> int:
        """Bytes the store occupies on disk."""
        data = os.path.join(self.path, "data.mdb")
        return os.stat(data).st_blocks * 512 if os.path.exists(data) else 0

    # --- writes -----------------------------------------------------------------------
    def _write(self) -> "_WriteTxn":
        return _WriteTxn(self)

    def put(self, images: list[StoredImage], versions: list[int] | None = None) -> PutResult:
        """Store (or replace) images durably, each only if its version is newer than the one held
        for its id (last writer wins; version 0 = "the next version of this store", for writes
        that come without one)."""
        with self._write() as w:
            replaced, labels, applied = [], [], []
            for i, img in enumerate(images):
                version = versions[i] if versions else 0
                version = w.newer_version(img.image_id, version)
                if version is None:
                    continue
                old = w.label_of(img.image_id)
                if old is not None:
                    w.remove(old)
                    replaced.append(old)
                labels.append(w.add(img))
                w.set_version(img.image_id, version, False, np.ascontiguousarray(img.vector, np.float32).tobytes())
                applied.append(i)
            return PutResult(labels, replaced, applied, w.seq)

    def delete(self, ids: list[str], versions: list[int] | None = None) -> tuple[list[str], list[str], list[int], int]:
        """Remove ids durably, leaving a tombstone of each delete's version; returns (deleted,
        missing, their labels, sequence number). A delete older than the id's last write changes
        nothing (the id is reported missing if it is not live)."""
        with self._write() as w:
            deleted, missing, labels = [], [], []
            for i, image_id in enumerate(ids):
                version = w.newer_version(image_id, versions[i] if versions else 0)
                label = w.label_of(image_id)
                if version is None or label is None:
                    if version is not None:
                        w.set_version(image_id, version, True, b"")
                    missing.append(image_id)
                    continue
                w.remove(label)
                w.set_version(image_id, version, True, b"")
                deleted.append(image_id)
                labels.append(label)
            return deleted, missing, labels, w.seq

    def put_setting(self, key: str, value: bytes | None) -> int:
        """Set (or clear) a setting durably; returns the sequence number."""
        with self._write() as w:
            if value is None:
                w.txn.delete(key.encode(), db=self.dbs["settings"])
            else:
                w.txn.put(key.encode(), value, db=self.dbs["settings"])
            return w.seq

    def pending_changes(self) -> int:
        """Changes (an image added, deleted or replaced counts each label it adds or removes)
        the last faiss snapshot does not reflect: the snapshot cadence counts these."""
        with self.env.begin() as txn:
            return int(txn.stat(self.dbs["changes"])["entries"])

    def record_snapshot(self, seq: int, record: dict) -> None:
        """Remember a saved faiss snapshot and drop the changes it already reflects."""
        with self.env.begin(write=True) as txn:
            txn.put(b"snapshot", json.dumps(record).encode(), db=self.dbs["settings"])
            cur = txn.cursor(db=self.dbs["changes"])
            end = (seq + 1) << _CHANGE_BITS
            if cur.first():
                while cur.key() and _U64.unpack(cur.key())[0] < end:
                    if not cur.delete():
                        break

    # --- reads ------------------------------------------------------------------------
    def label_of(self, image_id: str) -> int | None:
        with self.env.begin() as txn:
            raw = txn.get(image_id.encode("utf-8"), db=self.dbs["ids"])
            return None if raw is None else _U64.unpack(raw)[0]

    def infos(self, labels: list[int]) -> list[ImageInfo | None]:
        """Id, size and metadata of each label (None where it no longer exists)."""
        with self.env.begin(buffers=True) as txn:
            out = []
            for label in labels:
                raw = txn.get(_label_key(label), db=self.dbs["info"])
                out.append(None if raw is None else _decode_info(raw, f"info of label {label}"))
            return out

    def vectors(self, labels: list[int], dim: int) -> np.ndarray:
        """(n, D) raw global vectors of existing labels, in order (KeyError if one is gone)."""
        out = np.empty((len(labels), dim), np.float32)
        with self.env.begin(buffers=True) as txn:
            for i, label in enumerate(labels):
                raw = txn.get(_label_key(label), db=self.dbs["vec"])
                if raw is None:
                    raise KeyError(label)
                out[i] = np.frombuffer(_opened(raw, f"vector of label {label}"), np.float32)
        return out

    def get(self, image_id: str, *, regional: bool = True, local: bool = True) -> StoredImage | None:
        """One image's record, reading only the parts asked for."""
        with self.env.begin(buffers=True) as txn:
            raw = txn.get(image_id.encode("utf-8"), db=self.dbs["ids"])
            if raw is None:
                return None
            label = _U64.unpack(raw)[0]
            key = _label_key(label)
            info = _decode_info(txn.get(key, db=self.dbs["info"]), f"info of {image_id!r}")
            vec = np.frombuffer(_opened(txn.get(key, db=self.dbs["vec"]), f"vector of {image_id!r}"), np.float32).copy()
            reg = loc = None
            if regional:
                r = txn.get(key, db=self.dbs["reg"])
                if r is not None:
                    reg = np.frombuffer(_opened(r, f"regional of {image_id!r}"), np.float16).reshape(-1, vec.shape[0]).copy()
            if local:
                lo = txn.get(key, db=self.dbs["loc"])
                if lo is not None:
                    loc = _decode_local(lo, f"local features of {image_id!r}")
            return StoredImage(info.image_id, vec, reg, loc, info.metadata, info.width, info.height)

    def regional_of(self, labels: list[int], dim: int) -> list[np.ndarray | None]:
        """(R, D) float16 regional centroids of each label (None when it has none)."""
        with self.env.begin(buffers=True) as txn:
            out: list[np.ndarray | None] = []
            for label in labels:
                r = txn.get(_label_key(label), db=self.dbs["reg"])
                out.append(None if r is None else np.frombuffer(_opened(r, f"regional of label {label}"), np.float16).reshape(-1, dim).copy())
            return out

    def labels_from(self, cursor: int, limit: int) -> list[int]:
        """Up to ``limit`` existing labels ≥ ``cursor``, ascending."""
        out: list[int] = []
        with self.env.begin() as txn:
            cur = txn.cursor(db=self.dbs["vec"])
            if not cur.set_range(_label_key(cursor)):
                return out
            for key in cur.iternext(keys=True, values=False):
                out.append(_U64.unpack(key)[0])
                if len(out) >= limit:
                    break
        return out

    def id_infos(self, ids: list[str]) -> list[tuple[int, ImageInfo] | None]:
        """(label, info) of each id, None where it does not exist (one read snapshot)."""
        with self.env.begin(buffers=True) as txn:
            out: list[tuple[int, ImageInfo] | None] = []
            for image_id in ids:
                raw = txn.get(image_id.encode("utf-8"), db=self.dbs["ids"])
                if raw is None:
                    out.append(None)
                    continue
                label = _U64.unpack(raw)[0]
                out.append((label, _decode_info(txn.get(_label_key(label), db=self.dbs["info"]), f"info of {image_id!r}")))
            return out

    def ids_after(self, after: str, max_scan: int) -> tuple[list[tuple[str, int]], bool]:
        """Up to ``max_scan`` (id, label) pairs with id > ``after`` in bytewise UTF-8 order (the
        ``ids`` sub-database's key order), and whether they reach the last id."""
        out: list[tuple[str, int]] = []
        start = after.encode("utf-8")
        with self.env.begin() as txn:
            cur = txn.cursor(db=self.dbs["ids"])
            if not cur.set_range(start):
                return out, True
            for key, value in cur.iternext(keys=True, values=True):
                if key == start:
                    continue
                if len(out) >= max_scan:
                    return out, False
                out.append((bytes(key).decode("utf-8"), _U64.unpack(value)[0]))
        return out, True

    def versions_after(self, after: str, limit: int, upto: str | None = None) -> tuple[list[VersionEntry], bool]:
        """Up to ``limit`` version entries (live and deleted) with ``after`` < id (≤ ``upto``) in
        bytewise UTF-8 order, and whether they reach the end of that range."""
        out: list[VersionEntry] = []
        start = after.encode("utf-8")
        end = upto.encode("utf-8") if upto is not None else None
        with self.env.begin() as txn:
            cur = txn.cursor(db=self.dbs["versions"])
            if not cur.set_range(start):
                return out, True
            for key, value in cur.iternext(keys=True, values=True):
                if key == start:
                    continue
                if end is not None and key > end:
                    return out, True
                if len(out) >= limit:
                    return out, False
                version, deleted, _ = _VERSION.unpack(value)
                out.append(VersionEntry(bytes(key).decode("utf-8"), version, bool(deleted)))
        return out, True

    def versions_of(self, ids: list[str]) -> list[VersionEntry | None]:
        """The version entry of each id (None: never written here)."""
        with self.env.begin() as txn:
            out: list[VersionEntry | None] = []
            for image_id in ids:
                raw = txn.get(image_id.encode("utf-8"), db=self.dbs["versions"])
                if raw is None:
                    out.append(None)
                    continue
                version, deleted, _ = _VERSION.unpack(raw)
                out.append(VersionEntry(image_id, version, bool(deleted)))
            return out

    def iter_infos(self) -> Iterator[tuple[int, ImageInfo]]:
        """Every (label, info) in label order, from one read snapshot."""
        with self.env.begin(buffers=True) as txn:
            for key, value in txn.cursor(db=self.dbs["info"]):
                label = _U64.unpack(key)[0]
                yield label, _decode_info(value, f"info of label {label}")

    def iter_vectors(
        self, dim: int, chunk: int = 4096, on_open: Callable[[int], None] | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every (labels (n,), raw vectors (n, D)) chunk in label order, from one read snapshot
        of the store; ``on_open`` receives that snapshot's sequence number."""
        with self.env.begin(buffers=True) as txn:
            if on_open is not None:
                on_open(self._counter(txn, "seq"))
            cur = txn.cursor(db=self.dbs["vec"])
            labels: list[int] = []
            vecs = np.empty((chunk, dim), np.float32)
            for key, value in cur:
                label = _U64.unpack(key)[0]
                vecs[len(labels)] = np.frombuffer(_opened(value, f"vector of label {label}"), np.float32)
                labels.append(label)
                if len(labels) == chunk:
                    yield np.asarray(labels, np.int64), vecs.copy()
                    labels = []
            if labels:
                yield np.asarray(labels, np.int64), vecs[: len(labels)].copy()

    def labels_existing(self, labels: list[int]) -> list[int]:
        """The subset of ``labels`` still stored."""
        with self.env.begin() as txn:
            return [l for l in labels if txn.get(_label_key(l), db=self.dbs["vec"]) is not None]

    def all_labels(self) -> np.ndarray:
        """(n,) int64 every existing label, ascending."""
        with self.env.begin() as txn:
            cur = txn.cursor(db=self.dbs["vec"])
            return np.fromiter((_U64.unpack(k)[0] for k in cur.iternext(keys=True, values=False)), np.int64)

    def changes_after(self, seq: int) -> list[tuple[int, int, int]]:
        """(seq, op, label) of every change after ``seq``, in order."""
        out = []
        with self.env.begin() as txn:
            cur = txn.cursor(db=self.dbs["changes"])
            if cur.set_range(_U64.pack((seq + 1) << _CHANGE_BITS)):
                for key, value in cur:
                    op, label = _CHANGE.unpack(value)
                    out.append((_U64.unpack(key)[0] >> _CHANGE_BITS, op, label))
        return out

    def read_snapshot_record(self) -> dict | None:
        raw = self.setting("snapshot")
        return None if raw is None else json.loads(raw)


class _WriteTxn:
    """One durable write: counters loaded at begin, saved with the data at commit."""

    def __init__(self, store: ShardStore) -> None:
        self.store = store
        self.dbs = store.dbs
        self.change_no = 0

    def __enter__(self) -> "_WriteTxn":
        self.txn = self.store.env.begin(write=True)
        self.c = {k: self.store._counter(self.txn, k) for k in _COUNTERS}
        self.c["seq"] += 1
        self.seq = self.c["seq"]
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.txn.abort()
            if issubclass(exc_type, lmdb.MapFullError):  # a put inside the write ran out of map
                raise self._map_full() from exc
            return
        try:
            for k, v in self.c.items():
                self.txn.put(k.encode(), _U64.pack(v), db=self.dbs["settings"])
            t0 = time.perf_counter()
            self.txn.commit()
            if self.store.on_commit is not None:
                self.store.on_commit(time.perf_counter() - t0)
        except lmdb.MapFullError as err:
            raise self._map_full() from err
        except lmdb.Error as err:
            # LMDB reports a short write at a full disk as EIO: judge by the space left
            if _is_enospc(err) or _disk_nearly_full(self.store.path):
                raise StoreFull(f"shard store {self.store.path}: no space left on device") from err
            raise Unavailable(f"shard store {self.store.path}: write failed ({err})") from err

    def _map_full(self) -> StoreFull:
        return StoreFull(f"shard store {self.store.path} reached its map size of {self.store.map_size_bytes} bytes")

    def newer_version(self, image_id: str, version: int) -> int | None:
        """The version a write of ``image_id`` gets here: ``version`` when it is newer than the
        held one (0: one past the store's newest), None when the write is older (skip it)."""
        if version == 0:
            return self.c["max_version"] + 1
        raw = self.txn.get(image_id.encode("utf-8"), db=self.dbs["versions"])
        if raw is not None and _VERSION.unpack(raw)[0] >= version:
            return None
        return version

    def set_version(self, image_id: str, version: int, deleted: bool, vector: bytes) -> None:
        """Record an id's last write and update the digest, tombstone count and newest version."""
        key = image_id.encode("utf-8")
        raw = self.txn.get(key, db=self.dbs["versions"])
        if raw is not None:
            _, was_deleted, old_term = _VERSION.unpack(raw)
            self.c["digest"] = (self.c["digest"] - old_term) & _MASK64
            self.c["tombstones"] -= was_deleted
        term = digest_term(image_id, version, deleted, vector)
        self.txn.put(key, _VERSION.pack(version, deleted, term), db=self.dbs["versions"])
        self.c["digest"] = (self.c["digest"] + term) & _MASK64
        self.c["tombstones"] += deleted
        self.c["max_version"] = max(self.c["max_version"], version)

    def _change(self, op: int, label: int) -> None:
        self.txn.put(_U64.pack((self.seq << _CHANGE_BITS) + self.change_no), _CHANGE.pack(op, label), db=self.dbs["changes"])
        self.change_no += 1

    def label_of(self, image_id: str) -> int | None:
        raw = self.txn.get(image_id.encode("utf-8"), db=self.dbs["ids"])
        return None if raw is None else _U64.unpack(raw)[0]

    def add(self, img: StoredImage) -> int:
        label = self.c["next_label"]
        self.c["next_label"] += 1
        key = _label_key(label)
        self.txn.put(img.image_id.encode("utf-8"), key, db=self.dbs["ids"])
        self.txn.put(key, _encode_info(img), db=self.dbs["info"])
        self.txn.put(key, _sealed(np.ascontiguousarray(img.vector, np.float32).tobytes()), db=self.dbs["vec"])
        if img.regional is not None:
            self.txn.put(key, _sealed(np.ascontiguousarray(img.regional, np.float16).tobytes()), db=self.dbs["reg"])
            self.c["regional_vectors"] += len(img.regional)
        if img.local is not None:
            self.txn.put(key, _encode_local(img.local), db=self.dbs["loc"])
            self.c["local_features"] += len(img.local.keypoints)
        self.c["images"] += 1
        self.c["feature_bytes"] += img.nbytes
        regions = 0 if img.regional is None else len(img.regional)
        local, local_dim = (0, 0) if img.local is None else img.local.descriptors.shape
        self.c["oversized"] += above_limits(img.metadata, len(img.vector), regions, local, local_dim) is not None
        self._change(OP_ADD, label)
        return label

    def remove(self, label: int) -> None:
        key = _label_key(label)
        info = _decode_info(self.txn.get(key, db=self.dbs["info"]), f"info of label {label}")
        self.c["oversized"] -= _record_above_limits(self.txn, self.dbs, key, info) is not None
        vec = self.txn.get(key, db=self.dbs["vec"])
        nbytes = len(vec) - _CRC.size
        reg = self.txn.get(key, db=self.dbs["reg"])
        if reg is not None:
            n = (len(reg) - _CRC.size) // 2
            self.c["regional_vectors"] -= n // ((len(vec) - _CRC.size) // 4)
            nbytes += n * 2
        loc = self.txn.get(key, db=self.dbs["loc"])
        if loc is not None:
            n, c, _ = _LOCAL.unpack_from(loc)
            self.c["local_features"] -= n
            nbytes += n * 4 * 2 + n * c
        self.txn.delete(info.image_id.encode("utf-8"), db=self.dbs["ids"])
        for name in ("info", "vec", "reg", "loc"):
            self.txn.delete(key, db=self.dbs[name])
        self.c["images"] -= 1
        self.c["feature_bytes"] -= nbytes
        self._change(OP_DELETE, label)


def _record_above_limits(txn: lmdb.Transaction, dbs: dict, key: bytes, info: ImageInfo) -> str | None:
    """``above_limits`` of one stored record, from its info and the sizes of its feature values."""
    dim = (len(txn.get(key, db=dbs["vec"])) - _CRC.size) // 4
    reg = txn.get(key, db=dbs["reg"])
    regions = (len(reg) - _CRC.size) // (2 * dim) if reg is not None and dim else 0
    loc = txn.get(key, db=dbs["loc"])
    local, local_dim, _ = _LOCAL.unpack_from(loc) if loc is not None else (0, 0, 0.0)
    return above_limits(info.metadata, dim, regions, local, local_dim)


def _is_enospc(err: lmdb.Error) -> bool:
    return getattr(err, "errno", None) == errno.ENOSPC or "No space left" in str(err)


def _disk_nearly_full(path: str, reserve_bytes: int = 64 << 20) -> bool:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize < reserve_bytes


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
