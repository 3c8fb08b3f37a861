"""The faiss side of a shard: exact search while small, a trained approximate index when large.

Pure algorithms on numpy/faiss (no I/O but the snapshot file helpers at the bottom).
Vectors here are already in the indexed space (whitened, L2-normalised); ids are the store's
int64 labels.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from typing import Callable

import faiss
import numpy as np


@dataclass(frozen=True)
class IndexSettings:
    """How a shard indexes its global vectors.

    Attributes
    ----------
    factory : str
        "auto": exact (flat inner product) below ``approx_min_images``, then an IVF-PQ index
        sized to the shard (``services.space.ann.ivfpq_factory``) trained in the background; "Flat": always exact;
        any other faiss factory string: exact until ``approx_min_images``, then that index.
    approx_min_images : int
        Images from which the approximate index is trained (0 = never).
    shortlist : int
        Candidates the approximate index returns per query before exact re-scoring from the
        stored vectors (at least the request's top-k).
    nprobe : int
        Inverted lists visited per query by IVF indexes.
    train_sample : int
        Vectors the approximate index is trained on (a random sample of the shard).
    snapshot_every : int
        Changes (adds + deletes) after which the faiss index is snapshotted in the background.
    retrain_growth : float
        With ``factory="auto"``, the approximate index is retrained (in the background, the old
        one serving meanwhile) once the shard holds this many times the images it was sized for.
    filter_exact_max : int
        With the approximate index, a metadata filter that keeps at most this many images is
        answered by exact scoring over their stored vectors (tens of ms); above it, by the IVF
        search restricted to them (exact scoring again when the probed lists hold fewer than k).
    """

    factory: str = "auto"
    approx_min_images: int = 100_000
    shortlist: int = 1000
    nprobe: int = 48
    train_sample: int = 100_000
    snapshot_every: int = 20_000
    retrain_growth: float = 4.0
    filter_exact_max: int = 20_000

    def __post_init__(self) -> None:
        checks = {
            "approx_min_images": self.approx_min_images >= 0,
            "shortlist": self.shortlist >= 1,
            "nprobe": self.nprobe >= 1,
            "train_sample": self.train_sample >= 1000,
            "snapshot_every": self.snapshot_every >= 1,
            "retrain_growth": self.retrain_growth > 1,
            "filter_exact_max": self.filter_exact_max >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"index.{name}: invalid value {getattr(self, name)!r}")
        if self.factory not in ("auto", "Flat"):
            try:
                faiss.index_factory(16, self.factory, faiss.METRIC_INNER_PRODUCT)
            except RuntimeError as exc:
                raise ValueError(f"index factory string {self.factory!r} is invalid: {exc}") from None

    @property
    def approximate(self) -> bool:
        return self.factory != "Flat" and self.approx_min_images > 0


class _LabelledIndex:
    """A faiss index whose ids are the store's labels (shared by the exact and approximate ones)."""

    index: faiss.Index

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def add(self, labels: np.ndarray, vecs: np.ndarray) -> None:
        """Add (n,) labels with their (n, D') vectors."""
        if len(labels):
            self.index.add_with_ids(np.ascontiguousarray(vecs, np.float32), np.asarray(labels, np.int64))

    def remove(self, labels: np.ndarray) -> None:
        """Remove (n,) labels (absent ones are ignored)."""
        if len(labels):
            self.index.remove_ids(faiss.IDSelectorBatch(np.asarray(labels, np.int64)))


class ExactIndex(_LabelledIndex):
    """Flat inner product over every vector (ids = labels)."""

    kind = "exact"

    def __init__(self, dim: int, index: faiss.Index | None = None) -> None:
        self.dim = dim
        self.index = index if index is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(dim))

    def search(self, q: np.ndarray, k: int, rescore: Callable[[np.ndarray], np.ndarray],
               allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(D',) query → labels (n,), scores (n,), and their vectors (n, D') when cheap (None here);
        ``allowed`` (labels) restricts the search to them."""
        k = min(k, self.ntotal)
        if k == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32), None
        params = None if allowed is None else faiss.SearchParameters(sel=faiss.IDSelectorBatch(np.asarray(allowed, np.int64)))
        scores, labels = self.index.search(q[None, :], k, params=params)
        keep = labels[0] >= 0
        return labels[0][keep], scores[0][keep], None

    def search_many(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(n, D') queries → (n, k) labels (-1 padded) and scores, in one faiss call."""
        k = min(k, self.ntotal)
        scores, labels = self.index.search(np.ascontiguousarray(queries, np.float32), k)
        return labels, scores

    def reconstruct(self, labels: np.ndarray) -> np.ndarray:
        return np.stack([self.index.reconstruct(int(l)) for l in labels]) if len(labels) else np.zeros((0, self.dim), np.float32)


class ApproxIndex(_LabelledIndex):
    """A trained faiss index whose shortlist is re-scored exactly from the stored vectors."""

    kind = "approximate"

    def __init__(self, index: faiss.Index, shortlist: int, nprobe: int, factory: str = "", trained_for: int = 0) -> None:
        self.index = index
        self.factory = factory
        self.trained_for = trained_for or int(index.ntotal)  # shard size its lists were sized for
        self.dim = index.d
        self.shortlist = shortlist
        self.set_nprobe(nprobe)

    def set_nprobe(self, nprobe: int) -> None:
        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None:
            ivf.nprobe = nprobe

    @staticmethod
    def train(factory: str, sample: np.ndarray, shortlist: int, nprobe: int) -> "ApproxIndex":
        """Train ``factory`` on (n, D') ``sample``."""
        index = faiss.index_factory(sample.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        if not _supports_ids(index):
            index = faiss.IndexIDMap2(index)
        index.train(np.ascontiguousarray(sample, np.float32))
        return ApproxIndex(index, shortlist, nprobe, factory)

    def search(self, q: np.ndarray, k: int, rescore: Callable[[np.ndarray], np.ndarray],
               allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Shortlist by the compressed codes, then exact inner products of ``rescore(labels)``
        ((n,) labels → (n, D') stored vectors in the indexed space); ``allowed`` (labels)
        restricts the shortlist to them."""
        n = min(max(k, self.shortlist), self.ntotal)
        if n == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32), None
        params = None
        if allowed is not None:
            sel = faiss.IDSelectorBatch(np.asarray(allowed, np.int64))
            ivf = faiss.try_extract_index_ivf(self.index)
            params = faiss.SearchParametersIVF(sel=sel, nprobe=ivf.nprobe) if ivf is not None else faiss.SearchParameters(sel=sel)
        _, labels = self.index.search(q[None, :], n, params=params)
        labels = labels[0][labels[0] >= 0]
        vecs = rescore(labels)
        scores = vecs @ q
        order = np.argsort(-scores, kind="stable")[:k]
        return labels[order], scores[order].astype(np.float32), vecs[order]


def _supports_ids(index: faiss.Index) -> bool:
    return faiss.try_extract_index_ivf(index) is not None


# --- snapshot files ------------------------------------------------------------------------
class SnapshotCorrupt(Exception):
    """A snapshot file is missing, truncated or does not match its checksum."""


def serialize(index: faiss.Index) -> np.ndarray:
    """The index as a uint8 array (a consistent copy to write outside the shard's lock)."""
    return faiss.serialize_index(index)


def write_blob(blob: np.ndarray, path: str) -> dict:
    """Write a serialized index atomically; returns its file record (name, bytes, CRC32)."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(memoryview(blob))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"file": os.path.basename(path), "bytes": int(blob.size), "crc32": zlib.crc32(memoryview(blob))}


def read_snapshot(directory: str, record: dict) -> faiss.Index:
    """Load the snapshot a file record names; raises SnapshotCorrupt when it does not check out."""
    path = os.path.join(directory, record["file"])
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise SnapshotCorrupt(f"{path}: {exc.strerror}") from None
    if len(data) != record["bytes"] or zlib.crc32(data) != record["crc32"]:
        raise SnapshotCorrupt(f"{path}: {len(data)} bytes, checksum mismatch (expected {record['bytes']} bytes)")
    try:
        return faiss.deserialize_index(np.frombuffer(data, np.uint8))
    except RuntimeError as exc:
        raise SnapshotCorrupt(f"{path}: faiss cannot read it ({exc})") from None
