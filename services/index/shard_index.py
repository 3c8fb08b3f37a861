"""In-memory index of one shard: faiss global index, regional vectors, local-feature store.

Pure state + algorithms, no gRPC. Not thread-safe: the servicer serialises writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import faiss
import numpy as np

from services.extractor.whitening import PCAWhitening, to_indexed_space


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

    def dequantized(self) -> tuple[np.ndarray, np.ndarray]:
        """(N, 4) float32 keypoints and (N, C) float32 descriptors."""
        return self.keypoints.astype(np.float32), self.descriptors.astype(np.float32) * self.scale


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


@dataclass
class SearchHits:
    """Top results of one query: ids, scores (D-dimensional inner products), whitened vectors."""

    ids: list[str]
    scores: np.ndarray  # (n,) float32
    vectors: np.ndarray | None  # (n, D') float32
    metadata: list[dict[str, str]]


@dataclass(frozen=True)
class VectorPage:
    """A page of :meth:`ShardIndex.list_vectors`."""

    ids: list[str]
    vectors: np.ndarray  # (n, D') as indexed
    next_cursor: int
    done: bool
    regional: np.ndarray  # (m, D') as indexed, images in order
    regional_counts: list[int]  # (n,) regional vectors per image


class ShardIndex:
    """A shard's images, searchable by global-descriptor inner product.

    Parameters
    ----------
    factory : str
        faiss index factory string for the (whitened) global vectors, e.g. "Flat" or
        "IVF256,Flat" (trained automatically once enough vectors exist) or "HNSW32".
    """

    def __init__(self, factory: str = "Flat") -> None:
        self.factory = factory
        self._check_factory(factory)
        self.images: dict[int, StoredImage] = {}
        self.label_of: dict[str, int] = {}
        self._next_label = 0
        self.whitening: PCAWhitening | None = None
        self.dim = 0  # raw descriptor dimension
        self._index: faiss.Index | None = None

    @staticmethod
    def _check_factory(factory: str) -> None:
        try:
            faiss.index_factory(8 if "PQ" not in factory else 16, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise ValueError(f"index factory string {factory!r} is invalid: {exc}") from None

    # --- transforms -------------------------------------------------------------------
    def transform(self, raw: np.ndarray) -> np.ndarray:
        """(n, D) raw L2-normalised vectors → (n, D') vectors as indexed (whitened, L2)."""
        return to_indexed_space(raw, self.whitening)

    @property
    def indexed_dim(self) -> int:
        """Dimension of vectors in the faiss index (0 while empty)."""
        if self.dim == 0:
            return 0
        return self.whitening.output_dim if self.whitening is not None else self.dim

    def set_whitening(self, whitening: PCAWhitening | None) -> None:
        """Install (or remove) the collection whitening and re-index every stored vector."""
        if whitening is not None and self.dim and whitening.input_dim != self.dim:
            raise ValueError(f"whitening: input dimension {whitening.input_dim} != stored dimension {self.dim}")
        self.whitening = whitening
        self._rebuild()

    # --- writes -----------------------------------------------------------------------
    def add(self, records: list[StoredImage]) -> int:
        """Store or replace images; returns how many were stored."""
        for rec in records:
            if rec.vector.ndim != 1:
                raise ValueError(f"features.global of {rec.image_id!r}: expected a (D,) vector")
            if self.dim == 0:
                self.dim = int(rec.vector.shape[0])
            elif rec.vector.shape[0] != self.dim:
                raise ValueError(
                    f"features.global of {rec.image_id!r}: dimension {rec.vector.shape[0]} != index dimension {self.dim}"
                )
        labels = []
        for rec in records:
            old = self.label_of.pop(rec.image_id, None)
            if old is not None:
                self._remove_labels([old])
            label = self._next_label
            self._next_label += 1
            self.images[label] = rec
            self.label_of[rec.image_id] = label
            labels.append(label)
        if labels:
            self._index_add(labels)
        return len(labels)

    def delete(self, ids: list[str]) -> tuple[list[str], list[str]]:
        """Remove ids; returns (deleted, missing)."""
        deleted, missing, labels = [], [], []
        for image_id in ids:
            label = self.label_of.pop(image_id, None)
            if label is None:
                missing.append(image_id)
            else:
                deleted.append(image_id)
                labels.append(label)
        self._remove_labels(labels)
        return deleted, missing

    def _remove_labels(self, labels: list[int]) -> None:
        if not labels:
            return
        for label in labels:
            self.images.pop(label, None)
        if self._index is not None:
            self._index.remove_ids(np.asarray(labels, dtype=np.int64))

    # --- faiss ------------------------------------------------------------------------
    def _new_index(self, d: int) -> faiss.Index:
        return faiss.IndexIDMap2(faiss.index_factory(d, self.factory, faiss.METRIC_INNER_PRODUCT))

    def _index_add(self, labels: list[int]) -> None:
        if self._index is None or not self._index.is_trained:
            self._rebuild()
            return
        vecs = self.transform(np.stack([self.images[l].vector for l in labels]))
        self._index.add_with_ids(vecs, np.asarray(labels, dtype=np.int64))

    def _rebuild(self) -> None:
        """Re-create the faiss index from the stored raw vectors (after whitening changes)."""
        if not self.images:
            self._index = None
            return
        labels = np.fromiter(self.images.keys(), dtype=np.int64, count=len(self.images))
        vecs = self.transform(np.stack([self.images[int(l)].vector for l in labels]))
        index = self._new_index(vecs.shape[1])
        if not index.is_trained:
            try:
                index.train(vecs)
            except RuntimeError:
                index = None  # too few vectors to train this factory yet: brute force until then
        if index is None:
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(vecs.shape[1]))
        index.add_with_ids(vecs, labels)
        self._index = index

    # --- reads ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.images)

    def search(self, query: np.ndarray, top_k: int, return_vectors: bool = False, transformed: bool = False) -> SearchHits:
        """Top-k images for one (D,) raw query vector (or (D',) when ``transformed``), by inner product."""
        query = np.asarray(query, dtype=np.float32).reshape(-1)
        expected = self.indexed_dim if transformed else self.dim
        if expected and query.shape[0] != expected:
            raise ValueError(f"query: dimension {query.shape[0]} != index dimension {expected}")
        if self._index is None or self._index.ntotal == 0:
            return SearchHits([], np.zeros(0, np.float32), None, [])
        q = to_indexed_space(query, None) if transformed else self.transform(query)
        k = min(top_k, self._index.ntotal)
        scores, labels = self._index.search(q, k)
        keep = labels[0] >= 0
        labels, scores = labels[0][keep], scores[0][keep]
        recs = [self.images[int(l)] for l in labels]
        vectors = None
        if return_vectors:
            vectors = self.transform(np.stack([r.vector for r in recs])) if recs else np.zeros((0, self.indexed_dim), np.float32)
        return SearchHits([r.image_id for r in recs], scores.astype(np.float32), vectors, [dict(r.metadata) for r in recs])

    def get(self, image_id: str) -> StoredImage | None:
        """The stored record of an id, or None."""
        label = self.label_of.get(image_id)
        return None if label is None else self.images[label]

    def list_vectors(self, cursor: int, limit: int, regional: bool = False) -> VectorPage:
        """One page of stored images in label order, vectors in the indexed space.

        Labels only grow (a replaced image gets a new one), so ``cursor`` (the first label not
        yet returned) survives concurrent writes.
        """
        labels = sorted(l for l in self.images if l >= cursor) if cursor else sorted(self.images)
        page = labels[:limit]
        empty = np.zeros((0, self.indexed_dim), np.float32)
        if not page:
            return VectorPage([], empty, cursor, True, empty, [])
        recs = [self.images[l] for l in page]
        vecs = self.transform(np.stack([r.vector for r in recs]))
        regs, counts = empty, []
        if regional:
            per = [r.regional for r in recs]
            counts = [0 if x is None else len(x) for x in per]
            present = [x for x in per if x is not None and len(x)]
            if present:
                regs = self.transform(np.concatenate(present).astype(np.float32))
        return VectorPage([r.image_id for r in recs], vecs, page[-1] + 1, len(labels) <= limit, regs, counts)

    def sample_vectors(self, max_vectors: int, seed: int, regional: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Random sample of raw global (n, D) and, if asked, regional (m, D) vectors."""
        rng = np.random.default_rng(seed)
        labels = list(self.images.keys())
        if not labels:
            return np.zeros((0, self.dim), np.float32), np.zeros((0, self.dim), np.float32)
        pick = rng.choice(len(labels), size=min(max_vectors, len(labels)), replace=False)
        g = np.stack([self.images[labels[i]].vector for i in pick]).astype(np.float32)
        if not regional:
            return g, np.zeros((0, self.dim), np.float32)
        regs = [self.images[labels[i]].regional for i in pick if self.images[labels[i]].regional is not None]
        r = np.concatenate(regs).astype(np.float32) if regs else np.zeros((0, self.dim), np.float32)
        if len(r) > max_vectors:
            r = r[rng.choice(len(r), size=max_vectors, replace=False)]
        return g, r

    def stats(self) -> dict[str, int]:
        """Counts and bytes: images, regional_vectors, local_features, feature_bytes."""
        regional = sum(0 if r.regional is None else len(r.regional) for r in self.images.values())
        local = sum(0 if r.local is None else len(r.local.keypoints) for r in self.images.values())
        nbytes = sum(r.nbytes for r in self.images.values())
        return {"images": len(self.images), "regional_vectors": regional, "local_features": local, "feature_bytes": nbytes}
