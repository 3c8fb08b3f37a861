"""The broker's copy of the collection's regional vectors, so that regional diffusion does not
read ~1,000 images' regional vectors from the shards for every query.

``BuildGraph`` already pages every shard's regional vectors (in the indexed space) to build the
regional kNN graph; :class:`RegionalCopyWriter` keeps them as they pass — appended to a file in
the broker's data directory, exactly the values ``GetFeatures`` sends (the shard converts the
same indexed-space float32 vectors to float16 for the wire; the copy keeps those float16 values
widened to float32, which is exact, so that a query reads them without converting 5,000 × 1280
halves: measured 40 ms of a 120-ms diffusion stage) — and :class:`RegionalCopy` serves them
memory-mapped: the operating system keeps the pages that queries touch in RAM, the broker's heap
does not grow with the collection (25.6 KB per image at 5 regions × 1280 dimensions).

Kept in step with writes the way the graph is: an image replaced or deleted after the build is
*forgotten* (``CollectionModel.graph_forget``, persisted in ``graph_stale.txt``), so it and any
image added since are simply not in the copy, and the diffusion stage reads only those few from
their shards. A new build or a whitening change replaces or drops the copy with the graphs.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np

__all__ = ["RegionalCopy", "RegionalCopyWriter"]

INDEX_FILE = "regional_index.npz"
"""Names the vectors file of the current copy (written last, atomically: a crash mid-build leaves
the previous copy whole)."""
VECTORS_PREFIX = "regional_vectors-"


class RegionalCopy:
    """Regional vectors of the images a graph build saw, by image id.

    Parameters
    ----------
    ids : sequence of str
        ``(n,)`` image ids (an id may repeat when it was replaced while paging: the last wins).
    starts, counts : ndarray ``(n,)`` int64
        Each image's first row in ``vectors`` and its number of regional vectors.
    vectors : ndarray ``(M, D)`` float32
        The regional vectors in the indexed space, float16 values (a ``np.memmap`` when read
        from disk).
    """

    def __init__(self, ids: Sequence[str], starts: np.ndarray, counts: np.ndarray, vectors: np.ndarray) -> None:
        starts, counts = np.asarray(starts, np.int64), np.asarray(counts, np.int64)
        if not (len(ids) == len(starts) == len(counts)) or vectors.ndim != 2:
            raise ValueError(f"regional copy: {len(ids)} ids, {len(starts)} starts, {len(counts)} counts, vectors {vectors.shape}")
        if len(counts) and int((starts + counts).max()) > len(vectors):
            raise ValueError(f"regional copy: rows beyond the {len(vectors)} vectors stored")
        self.vectors = vectors
        self._rows = {image_id: (int(s), int(c)) for image_id, s, c in zip(ids, starts, counts)}

    def __len__(self) -> int:
        """Images served from the copy (those built minus forgotten)."""
        return len(self._rows)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def forget(self, ids: Sequence[str]) -> None:
        """Stop serving ``ids`` (replaced or deleted since the build): they are read from the shards."""
        for image_id in ids:
            self._rows.pop(image_id, None)

    def gather(self, image_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The regional vectors of the ``image_ids`` the copy holds, stacked in one block.

        Returns
        -------
        (positions (n,) int64, counts (n,) int64, block (sum counts, D) float32)
            ``positions``: where in ``image_ids`` each held image is (ascending; ids absent from
            the copy are skipped); ``counts``: its number of regional vectors (0 for an image
            without regions); ``block``: their vectors in that order, read with one gather from
            the mapped file.
        """
        found = [(p, self._rows[i]) for p, i in enumerate(image_ids) if i in self._rows]
        positions = np.array([p for p, _ in found], np.int64)
        counts = np.array([c for _, (_, c) in found], np.int64)
        if not found or not counts.sum():
            return positions, counts, np.zeros((0, self.dim), np.float32)
        rows = np.concatenate([np.arange(s, s + c) for _, (s, c) in found])
        return positions, counts, self.vectors[rows]  # fancy indexing: one copy out of the mapped file

    @classmethod
    def load(cls, directory: str) -> RegionalCopy | None:
        """The copy persisted in ``directory`` (memory-mapped), or None when there is none."""
        index = os.path.join(directory, INDEX_FILE)
        if not os.path.exists(index):
            return None
        with open(index, "rb") as f, np.load(io.BytesIO(f.read()), allow_pickle=False) as z:
            if "dtype" not in z.files or str(z["dtype"]) != "float32":
                return None  # another format (an earlier float16 copy): read from the shards until the next build
            ids, starts, counts, dim = [str(i) for i in z["ids"]], z["starts"], z["counts"], int(z["dim"])
            vectors = os.path.join(directory, str(z["vectors_file"]))
        rows = os.path.getsize(vectors) // (4 * dim) if dim else 0
        mapped = np.memmap(vectors, dtype=np.float32, mode="r", shape=(rows, dim)) if rows else np.zeros((0, dim), np.float32)
        return cls(ids, starts, counts, mapped)


class RegionalCopyWriter:
    """Collects the regional vectors of a graph build page by page.

    With a ``directory`` the vectors go straight to a temporary file there (the broker never
    holds the collection's regional vectors at once) and :meth:`finish` renames it into place;
    without one (a broker with no data directory) they are kept in memory.
    """

    def __init__(self, directory: str = "") -> None:
        self.directory = directory
        self._ids: list[str] = []
        self._counts: list[int] = []
        self._rows = 0
        self._dim = 0
        self._parts: list[np.ndarray] = []
        self._file = None
        if directory:
            os.makedirs(directory, exist_ok=True)
            self._name = f"{VECTORS_PREFIX}{os.urandom(6).hex()}.f32"
            self._tmp = os.path.join(directory, self._name)
            self._file = open(self._tmp, "wb")  # noqa: SIM115 - closed in finish/abort

    def add(self, ids: Sequence[str], counts: Sequence[int], vectors: np.ndarray) -> None:
        """One page: ``(n,)`` image ids, how many regional vectors each has, ``(sum(counts), D)`` vectors."""
        if int(sum(counts)) != len(vectors):
            raise ValueError(f"regional copy: counts sum to {sum(counts)} for {len(vectors)} vectors")
        if len(vectors):
            if self._dim and vectors.shape[1] != self._dim:
                raise ValueError(f"regional copy: dimension {vectors.shape[1]}, earlier pages had {self._dim}")
            self._dim = int(vectors.shape[1])
            # the wire's float16 rounding, kept as float32 (exact)
            values = np.ascontiguousarray(vectors, dtype=np.float16).astype(np.float32)
            if self._file is not None:
                self._file.write(values.tobytes())
            else:
                self._parts.append(values)
        self._ids.extend(ids)
        self._counts.extend(int(c) for c in counts)
        self._rows += len(vectors)

    def finish(self) -> RegionalCopy:
        """The copy (persisted and memory-mapped when the writer has a directory)."""
        counts = np.asarray(self._counts, np.int64)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64) if len(counts) else counts
        if self._file is None:
            vectors = np.concatenate(self._parts) if self._parts else np.zeros((0, self._dim), np.float32)
            return RegionalCopy(self._ids, starts, counts, vectors)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        buf = io.BytesIO()
        np.savez(buf, ids=np.array(self._ids, dtype=str), starts=starts, counts=counts, dim=np.int64(self._dim),
                 vectors_file=np.array(self._name), dtype=np.array("float32"))
        index_tmp = os.path.join(self.directory, INDEX_FILE + ".tmp")
        with open(index_tmp, "wb") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(index_tmp, os.path.join(self.directory, INDEX_FILE))  # the new copy is now the copy
        remove(self.directory, keep=self._name)
        copy = RegionalCopy.load(self.directory)
        assert copy is not None
        return copy

    def abort(self) -> None:
        """Drop what was written (the build failed)."""
        if self._file is not None and not self._file.closed:
            self._file.close()
            if os.path.exists(self._tmp):
                os.unlink(self._tmp)


def remove(directory: str, keep: str = "") -> None:
    """Delete a persisted copy (the graphs were removed), or with ``keep`` the vectors files of
    earlier copies (a mapped file stays readable to whoever still maps it until unmapped)."""
    if not directory or not os.path.isdir(directory):
        return
    if not keep and os.path.exists(os.path.join(directory, INDEX_FILE)):
        os.remove(os.path.join(directory, INDEX_FILE))
    for name in os.listdir(directory):
        if name.startswith(VECTORS_PREFIX) and name != keep:
            os.remove(os.path.join(directory, name))
